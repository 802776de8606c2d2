//! What a node is, as QEMU's `ImageInfo` and `BlockGraphInfo` say it
//! (block/qapi.c: bdrv_query_image_info, bdrv_query_block_graph_info):
//! `qemu-img info` prints them, the daemon's `query-named-block-nodes`
//! answers with them. Keys are inserted in schema order, which is the order
//! qemu-img prints them in.

use crate::driver::SnapshotInfo;
use crate::{ChildRole, Node};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// QEMU's ImageInfo for `node`; with `backing_chain`, the images of its
/// backing chain nest under `backing-image`.
pub async fn image_info(node: &Arc<Node>, backing_chain: bool) -> Map<String, Value> {
    let mut m = node_info(node).await;
    if backing_chain {
        if let Some(b) = node.skip_filters().backing() {
            let inner = Box::pin(image_info(&b, true)).await;
            let fs = m.remove("format-specific");
            m.insert("backing-image".into(), Value::Object(inner));
            if let Some(fs) = fs {
                m.insert("format-specific".into(), fs);
            }
        }
    }
    m
}

/// QEMU's BlockGraphInfo: the ImageInfo of `node` and, under `children`,
/// that of every child but the backing one, as `qemu-img info` shows them.
pub async fn block_graph_info(node: &Arc<Node>) -> Value {
    let mut m = node_info(node).await;
    let mut children = Vec::new();
    for c in node.children() {
        if c.role == ChildRole::Backing {
            continue;
        }
        let info = Box::pin(block_graph_info(&c.node)).await;
        children.push(json!({"name": c.role.name(), "info": info}));
    }
    m.insert("children".into(), Value::Array(children));
    Value::Object(m)
}

/// The node's own part of ImageInfo (QEMU: bdrv_do_query_node_info).
async fn node_info(node: &Arc<Node>) -> Map<String, Value> {
    let d = node.driver();
    let mut m = Map::new();
    m.insert("filename".into(), node.filename().into());
    m.insert("format".into(), node.format_name().into());
    // Only drivers that answer get_info say whether they are dirty.
    let info = node.info_node();
    if let Some(i) = &info {
        m.insert("dirty-flag".into(), i.driver().is_dirty().into());
    }
    if let Ok(Some(a)) = d.allocated_size().await {
        m.insert("actual-size".into(), a.into());
    }
    m.insert("virtual-size".into(), node.length().into());
    if let Some(cs) = info.and_then(|i| i.driver().cluster_size()) {
        m.insert("cluster-size".into(), cs.into());
    }
    if d.encrypted() {
        m.insert("encrypted".into(), true.into());
    }
    if let Some((bf, bfmt)) = d.backing_file() {
        m.insert("backing-filename".into(), bf.clone().into());
        // Left out when the image's directory cannot be told (quorum).
        if let Ok(full) = node.full_backing_filename(&bf) {
            m.insert("full-backing-filename".into(), full.into());
        }
        if let Some(f) = bfmt {
            m.insert("backing-filename-format".into(), f.into());
        }
    }
    if let Ok(snaps) = d.snapshots().await {
        if !snaps.is_empty() {
            let list: Vec<Value> = snaps.iter().map(snapshot_json).collect();
            m.insert("snapshots".into(), Value::Array(list));
        }
    }
    match d.format_specific() {
        Some(fs) => {
            m.insert("format-specific".into(), fs);
        }
        None if node.format_name() == "file" || node.format_name() == "host_device" => {
            m.insert(
                "format-specific".into(),
                json!({"type": node.format_name(), "data": {}}),
            );
        }
        None => {}
    }
    m
}

/// QEMU's SnapshotInfo (keys in schema order).
pub fn snapshot_json(sn: &SnapshotInfo) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), sn.id.clone().into());
    m.insert("name".into(), sn.name.clone().into());
    m.insert("vm-state-size".into(), sn.vm_state_size.into());
    m.insert("date-sec".into(), sn.date_sec.into());
    m.insert("date-nsec".into(), sn.date_nsec.into());
    m.insert(
        "vm-clock-sec".into(),
        (sn.vm_clock_nsec / 1_000_000_000).into(),
    );
    m.insert(
        "vm-clock-nsec".into(),
        (sn.vm_clock_nsec % 1_000_000_000).into(),
    );
    if let Some(ic) = sn.icount {
        m.insert("icount".into(), ic.into());
    }
    Value::Object(m)
}
