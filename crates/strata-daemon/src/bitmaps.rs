//! Dirty bitmaps over QMP (QEMU: block/monitor/bitmap-qmp-cmds.c):
//! `block-dirty-bitmap-add`, `-remove`, `-clear`, `-enable`, `-disable` and
//! `-merge` on the core's in-memory bitmaps, which NBD exports offer as
//! `qemu:dirty-bitmap:NAME`. Persistent bitmaps (stored in a qcow2 image)
//! are stored in a qcow2 image by its driver (Node::add_bitmap).

use crate::blockdev::Daemon;
use crate::commands::daemon_command;
use serde_json::Value;
use std::sync::Arc;
use strata_block::{DirtyBitmap, Node};
use strata_qmp::Qmp;

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

pub(crate) fn register(qmp: &mut Qmp, daemon: &Arc<Daemon>) {
    daemon_command(
        qmp,
        daemon,
        "block-dirty-bitmap-add",
        "BlockDirtyBitmapAdd",
        |d, a| async move {
            let node = d
                .graph
                .lookup(str_arg(&a, "node"))
                .map_err(|e| e.to_string())?;
            let flag = |k: &str| a.get(k).and_then(Value::as_bool) == Some(true);
            node.add_bitmap(
                str_arg(&a, "name"),
                a.get("granularity").and_then(Value::as_u64),
                flag("persistent"),
                flag("disabled"),
            )
            .await
            .map(drop)
            .map_err(|e| e.to_string())
        },
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
        |d, a| async move {
            let (n, b) = lookup(&d, str_arg(&a, "node"), str_arg(&a, "name"))?;
            n.bitmaps().clear(&b).map_err(|e| e.to_string())
        },
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
            move |d, a| async move {
                let (n, b) = lookup(&d, str_arg(&a, "node"), str_arg(&a, "name"))?;
                n.bitmaps().set_enabled(&b, on).map_err(|e| e.to_string())
            },
        );
    }
    daemon_command(
        qmp,
        daemon,
        "block-dirty-bitmap-merge",
        "BlockDirtyBitmapMerge",
        |d, a| async move {
            let (n, target) = lookup(&d, str_arg(&a, "node"), str_arg(&a, "target"))?;
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
                    None => lookup(&d, str_arg(s, "node"), str_arg(s, "name"))?.1,
                };
                sources.push(src);
            }
            n.bitmaps()
                .merge(&target, &sources)
                .map_err(|e| e.to_string())
        },
    );
}
