//! What the daemon tells about its graph (QEMU: block/qapi.c, block.c's
//! x-debug-query-block-graph, block/write-threshold.c):
//! `query-named-block-nodes`, `query-block`, `query-blockstats`,
//! `x-debug-query-block-graph`, and `block-set-write-threshold` with its
//! `BLOCK_WRITE_THRESHOLD` event.
//!
//! QEMU lists nodes in the order they were named, which for a format over
//! its file is file first; Strata's graph keeps the order nodes were opened
//! in, which is the same.

use crate::blockdev::Daemon;
use crate::commands::daemon_command;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use strata_block::{perm, ChildRole, Node, Perm};
use strata_qmp::Qmp;

/// Adds the query commands and block-set-write-threshold.
pub(crate) fn register(qmp: &mut Qmp, daemon: &Arc<Daemon>) {
    let d = Arc::clone(daemon);
    qmp.add_command(
        "query-named-block-nodes",
        Some("q_obj_query-named-block-nodes_arg"),
        Arc::new(move |args| {
            let d = Arc::clone(&d);
            Box::pin(async move {
                let flat = args.get("flat").and_then(Value::as_bool).unwrap_or(false);
                Ok(named_block_nodes(&d, flat).await)
            })
        }),
    );
    // The daemon has no named block backends (no -drive, no devices), so
    // like qemu-storage-daemon it lists none: exports' backends are unnamed.
    qmp.add_command(
        "query-block",
        None,
        Arc::new(|_| Box::pin(async { Ok(json!([])) })),
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "query-blockstats",
        Some("q_obj_query-blockstats_arg"),
        Arc::new(move |args| {
            let nodes = args.get("query-nodes").and_then(Value::as_bool) == Some(true);
            // Without query-nodes: the named backends, of which there are none.
            let list: Vec<Value> = if nodes {
                d.graph.nodes().iter().map(node_stats).collect()
            } else {
                Vec::new()
            };
            Box::pin(async move { Ok(Value::Array(list)) })
        }),
    );
    let d = Arc::clone(daemon);
    qmp.add_command(
        "x-debug-query-block-graph",
        None,
        Arc::new(move |_| {
            let g = block_graph(&d);
            Box::pin(async move { Ok(g) })
        }),
    );
    daemon_command(
        qmp,
        daemon,
        "block-set-write-threshold",
        "q_obj_block-set-write-threshold_arg",
        |d, a| async move {
            let name = a["node-name"].as_str().unwrap_or_default();
            let threshold = a["write-threshold"].as_u64().unwrap_or(0);
            let node = d
                .graph
                .find(name)
                .ok_or_else(|| format!("Device '{name}' not found"))?;
            let events = Arc::downgrade(&d);
            node.set_write_threshold(
                threshold,
                Some(Arc::new(move |e: strata_block::node::ThresholdExceeded| {
                    if let Some(d) = events.upgrade() {
                        d.emit(
                            "BLOCK_WRITE_THRESHOLD",
                            Some(json!({
                                "node-name": e.node_name,
                                "amount-exceeded": e.amount_exceeded,
                                "write-threshold": e.write_threshold,
                            })),
                        );
                    }
                })),
            );
            Ok(())
        },
    );
}

/// QEMU's bdrv_named_nodes_list: newest node first.
async fn named_block_nodes(d: &Daemon, flat: bool) -> Value {
    let mut list = Vec::new();
    for n in d.graph.nodes().iter().rev() {
        list.push(block_device_info(n, flat).await);
    }
    Value::Array(list)
}

/// QEMU's BlockDeviceInfo of a node that no named backend holds.
async fn block_device_info(n: &Arc<Node>, flat: bool) -> Value {
    let image = strata_block::info::image_info(n, !flat).await;
    let mut depth = 0;
    let mut b = image.get("backing-image");
    while let Some(i) = b {
        depth += 1;
        b = i.get("backing-image");
    }
    let (direct, no_flush) = n.cache_mode();
    let mut m = Map::new();
    m.insert("file".into(), n.filename().into());
    m.insert("node-name".into(), n.name().into());
    m.insert("ro".into(), n.is_read_only().into());
    m.insert("drv".into(), n.format_name().into());
    // A filter has no backing file of its own (QEMU: bs->backing_file).
    if let Some(b) = n.backing().filter(|_| !n.driver().is_filter()) {
        m.insert("backing_file".into(), b.filename().into());
    }
    m.insert("backing_file_depth".into(), depth.into());
    m.insert("active".into(), n.is_active().into());
    m.insert("encrypted".into(), n.driver().encrypted().into());
    m.insert("detect_zeroes".into(), n.detect_zeroes().name().into());
    // No throttling on a node itself: a throttle filter node carries it.
    for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
        m.insert(k.into(), 0.into());
    }
    m.insert("image".into(), Value::Object(image));
    m.insert(
        "cache".into(),
        // Writeback is a backend's setting; a bare node always has it.
        json!({"writeback": true, "direct": direct, "no-flush": no_flush}),
    );
    m.insert("write_threshold".into(), n.write_threshold().into());
    let bitmaps = n.bitmaps().info();
    if !bitmaps.is_empty() {
        let list: Vec<Value> = bitmaps.iter().map(dirty_info).collect();
        m.insert("dirty-bitmaps".into(), Value::Array(list));
    }
    Value::Object(m)
}

/// QEMU's BlockDirtyInfo.
fn dirty_info(b: &strata_block::bitmap::DirtyInfo) -> Value {
    let mut m = Map::new();
    if let Some(name) = &b.name {
        m.insert("name".into(), name.clone().into());
    }
    m.insert("count".into(), b.count.into());
    m.insert("granularity".into(), b.granularity.into());
    m.insert("recording".into(), b.recording.into());
    m.insert("busy".into(), b.busy.into());
    m.insert("persistent".into(), b.persistent.into());
    if b.inconsistent {
        m.insert("inconsistent".into(), true.into());
    }
    Value::Object(m)
}

/// QEMU's BlockStats of a node (node level: only the highest offset
/// written is counted; request counters belong to backends).
fn node_stats(n: &Arc<Node>) -> Value {
    let mut stats = Map::new();
    for k in [
        "rd_bytes",
        "wr_bytes",
        "zone_append_bytes",
        "unmap_bytes",
        "rd_operations",
        "wr_operations",
        "zone_append_operations",
        "flush_operations",
        "unmap_operations",
        "rd_total_time_ns",
        "wr_total_time_ns",
        "zone_append_total_time_ns",
        "flush_total_time_ns",
        "unmap_total_time_ns",
        "rd_merged",
        "wr_merged",
        "zone_append_merged",
        "unmap_merged",
        "failed_rd_operations",
        "failed_wr_operations",
        "failed_zone_append_operations",
        "failed_flush_operations",
        "failed_unmap_operations",
        "invalid_rd_operations",
        "invalid_wr_operations",
        "invalid_zone_append_operations",
        "invalid_flush_operations",
        "invalid_unmap_operations",
    ] {
        stats.insert(k.into(), 0.into());
    }
    stats.insert("wr_highest_offset".into(), n.wr_highest_offset().into());
    stats.insert("account_invalid".into(), false.into());
    stats.insert("account_failed".into(), false.into());
    stats.insert("timed_stats".into(), json!([]));
    let mut m = Map::new();
    m.insert("node-name".into(), n.name().into());
    m.insert("stats".into(), Value::Object(stats));
    if let Some(c) = data_child(n) {
        m.insert("parent".into(), node_stats(&c));
    }
    if let Some(mut s) = n.driver().specific_stats() {
        s.insert("driver".into(), n.format_name().into());
        m.insert("driver-specific".into(), Value::Object(s));
    }
    Value::Object(m)
}

/// The child that stores the node's data, if one does alone (QEMU: the
/// primary child when it holds data, else the only data child).
fn data_child(n: &Node) -> Option<Arc<Node>> {
    let children = n.children();
    if let Some(c) = children.iter().find(|c| c.role == ChildRole::DataFile) {
        return Some(Arc::clone(&c.node));
    }
    if children
        .iter()
        .any(|c| matches!(c.role, ChildRole::Quorum(_)))
    {
        return None;
    }
    children
        .into_iter()
        .find(|c| c.role.is_primary())
        .map(|c| c.node)
}

/// QEMU's BlockPermission names of `p`, highest first as its list is built.
fn perm_names(p: Perm) -> Value {
    const NAMES: [&str; 4] = ["consistent-read", "write", "write-unchanged", "resize"];
    let list: Vec<Value> = (0..4)
        .rev()
        .filter(|b| p.0 & (1 << b) != 0)
        .map(|b| NAMES[b as usize].into())
        .collect();
    Value::Array(list)
}

/// Numbers the graph's vertices in the order QEMU meets them.
#[derive(Default)]
struct Ids(Vec<usize>);

impl Ids {
    fn of(&mut self, key: usize) -> usize {
        match self.0.iter().position(|k| *k == key) {
            Some(i) => i + 1,
            None => {
                self.0.push(key);
                self.0.len()
            }
        }
    }
}

/// QEMU's x-debug-query-block-graph: the backends (user handles), then
/// every node with its edges; both lists built newest first.
fn block_graph(d: &Daemon) -> Value {
    let nodes = d.graph.nodes();
    let mut ids = Ids::default();
    let (mut vertices, mut edges) = (Vec::new(), Vec::new());
    let edge = |parent: usize, child: usize, name: String, (p, s): (Perm, Perm)| {
        json!({"parent": parent, "child": child, "name": name,
               "perm": perm_names(p), "shared-perm": perm_names(s)})
    };
    // A backend has no address of its own here: number it by its place.
    let mut backend_no = 0usize;
    for n in &nodes {
        for u in n.backend_users() {
            backend_no += 1;
            let id = ids.of(usize::MAX - backend_no);
            vertices.push(json!({"id": id, "type": "block-backend", "name": ""}));
            let child = ids.of(Arc::as_ptr(n) as usize);
            edges.push(edge(id, child, u.role, (u.perm, u.shared)));
        }
    }
    for n in &nodes {
        let id = ids.of(Arc::as_ptr(n) as usize);
        vertices.push(json!({"id": id, "type": "block-driver", "name": n.name()}));
        // QEMU keeps children newest first.
        for c in n.children().iter().rev() {
            let child = ids.of(Arc::as_ptr(&c.node) as usize);
            edges.push(edge(id, child, c.role.name(), perm::edge_perm(n, c.role)));
        }
    }
    vertices.reverse();
    edges.reverse();
    json!({"nodes": vertices, "edges": edges})
}
