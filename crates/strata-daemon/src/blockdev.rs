//! The block graph of the daemon and the commands that add nodes to it and
//! take them out (QEMU: qmp_blockdev_add, qmp_blockdev_del): nodes added
//! by the monitor are owned by it until `blockdev-del` or shutdown.

use serde_json::{Map, Value};
use std::sync::{Arc, Mutex};
use strata_block::{BlockOp, Graph, Node, OpenCtx, OpenFlags, Registry};

/// The daemon's nodes and what it needs to open more.
pub struct Daemon {
    /// The drivers.
    pub registry: Arc<Registry>,
    /// Every open node.
    pub graph: Arc<Graph>,
    /// Nodes added by blockdev-add, in the order they were added (QEMU:
    /// monitor_bdrv_states).
    owned: Mutex<Vec<Arc<Node>>>,
    /// I/O threads made by `--object iothread` and `object-add`.
    iothreads: Mutex<Vec<strata_block::IoThread>>,
    /// The NBD server and the block exports.
    pub exports: crate::exports::Exports,
    /// Where events go: the monitor, once it exists.
    events: Arc<std::sync::OnceLock<std::sync::Weak<strata_qmp::Qmp>>>,
    /// The block jobs.
    pub jobs: Arc<strata_jobs::JobList>,
}

/// Lists become dictionaries keyed `0`, `1`, ... as QEMU's qdict_flatten
/// makes them, which is how drivers read `children.0` or `inject-error.0`.
fn lists_to_dicts(v: Value) -> Value {
    match v {
        Value::Array(items) => Value::Object(
            items
                .into_iter()
                .enumerate()
                .map(|(i, x)| (i.to_string(), lists_to_dicts(x)))
                .collect(),
        ),
        Value::Object(m) => {
            Value::Object(m.into_iter().map(|(k, x)| (k, lists_to_dicts(x))).collect())
        }
        other => other,
    }
}

impl Daemon {
    /// A daemon with no nodes.
    pub fn new(registry: Arc<Registry>) -> Daemon {
        let events: Arc<std::sync::OnceLock<std::sync::Weak<strata_qmp::Qmp>>> = Arc::default();
        Daemon {
            registry,
            graph: Graph::new(),
            owned: Mutex::new(Vec::new()),
            iothreads: Mutex::new(Vec::new()),
            exports: Default::default(),
            jobs: strata_jobs::JobList::new(Arc::new({
                let events = Arc::clone(&events);
                move |event: &str, data: Value| {
                    if let Some(q) = events.get().and_then(std::sync::Weak::upgrade) {
                        q.emit(event, Some(data));
                    }
                }
            })),
            events,
        }
    }

    /// Sends events to the monitor `qmp` from now on.
    pub fn set_monitor(&self, qmp: &Arc<strata_qmp::Qmp>) {
        let _ = self.events.set(Arc::downgrade(qmp));
    }

    /// Emits a QMP event to every monitor client.
    pub fn emit(&self, event: &str, data: Option<Value>) {
        if let Some(q) = self.events.get().and_then(std::sync::Weak::upgrade) {
            q.emit(event, data);
        }
    }

    pub(super) fn iothreads(&self) -> std::sync::MutexGuard<'_, Vec<strata_block::IoThread>> {
        self.iothreads.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn owned(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Node>>> {
        self.owned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a node from checked `BlockdevOptions` (QEMU: qmp_blockdev_add
    /// and bds_tree_init): no format probing, read-write unless told
    /// otherwise, and a node name required at the top.
    pub async fn blockdev_add(&self, options: Value) -> Result<(), String> {
        let Value::Object(mut opts) = lists_to_dicts(options) else {
            return Err("'node-name' must be specified for the root node".into());
        };
        if !opts.get("node-name").is_some_and(Value::is_string) {
            return Err("'node-name' must be specified for the root node".into());
        }
        // bdrv_open's defaults are not blockdev-add's; these are.
        let cache = opts
            .entry("cache")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(c) = cache {
            c.entry("direct").or_insert(Value::Bool(false));
            c.entry("no-flush").or_insert(Value::Bool(false));
        }
        opts.entry("read-only").or_insert(Value::Bool(false));
        let node = self
            .blockdev_ctx()
            .open_image(None, None, opts)
            .await
            .map_err(|e| e.to_string())?;
        // Nodes shared by name must allow what the new node takes on them.
        if let Err(e) = strata_block::perm::check_attached(&node) {
            let _ = node.close().await;
            return Err(e.to_string());
        }
        self.owned().push(node);
        Ok(())
    }

    /// Reopens nodes with new options, all or nothing (QEMU:
    /// qmp_blockdev_reopen); the options are checked `BlockdevOptions`.
    pub async fn blockdev_reopen(&self, options: Value) -> Result<(), String> {
        let Value::Array(list) = options else {
            return Err("Invalid parameter type for 'options', expected: array".into());
        };
        let list = list
            .into_iter()
            .map(|o| match lists_to_dicts(o) {
                Value::Object(m) => m,
                _ => Map::new(),
            })
            .collect();
        strata_block::reopen::reopen_multiple(&self.graph, list)
            .await
            .map_err(|e| e.to_string())
    }

    /// How the monitor opens nodes in the daemon's graph (blockdev-add,
    /// blockdev-create's files): unlike the tools' opens, discards are
    /// ignored unless asked for (no BDRV_O_UNMAP); protocol children still
    /// pass them on.
    pub(crate) fn blockdev_ctx(&self) -> OpenCtx {
        let flags = OpenFlags {
            unmap: false,
            ..OpenFlags::default()
        };
        OpenCtx::with_graph(Arc::clone(&self.registry), flags, Arc::clone(&self.graph))
    }

    /// Drops the monitor's reference to a node it added, with QEMU's
    /// checks in QEMU's order (qmp_blockdev_del).
    pub async fn blockdev_del(&self, name: &str) -> Result<(), String> {
        let node = self.graph.find_node(name).map_err(|e| e.to_string())?;
        node.check_op(BlockOp::DriveDel)
            .map_err(|e| e.to_string())?;
        if self.exports.exports_node(&node) {
            return Err(format!("Node {name} is in use"));
        }
        let owned_at = self.owned().iter().position(|n| Arc::ptr_eq(n, &node));
        let Some(at) = owned_at else {
            return Err(format!("Node {name} is not owned by the monitor"));
        };
        if node.ref_count() > 1 {
            return Err(format!("Block device {name} is in use"));
        }
        self.owned().remove(at);
        // As bdrv_unref, closing reports nothing to the caller.
        let _ = node.close().await;
        Ok(())
    }

    /// Drops every reference the monitor holds, in the order the nodes
    /// were added (QEMU: bdrv_close_all at shutdown): each image is
    /// written back and closed once its last user is gone.
    pub async fn close_all(&self) {
        // Exports first: they are users of the nodes; then the jobs, as
        // qemu-storage-daemon cancels them before it closes the nodes.
        self.exports.close_all(self).await;
        self.jobs.cancel_all().await;
        let nodes: Vec<Arc<Node>> = std::mem::take(&mut *self.owned());
        for n in nodes {
            if let Err(e) = n.close().await {
                strata_block::report::error_report(e);
            }
        }
    }
}
