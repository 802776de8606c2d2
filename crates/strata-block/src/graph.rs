//! The block graph (QEMU: graph_bdrv_states): every node opened through one
//! [`OpenCtx`](crate::OpenCtx) family, findable by name, plus the parent
//! edges each node keeps so that it knows who uses it.
//!
//! The graph holds nodes weakly: a node lives as long as its users (parents,
//! the monitor, a tool) hold references, and goes when the last one closes it.

use crate::driver::ChildRole;
use crate::error::{Error, Result};
use crate::node::Node;
use std::sync::{Arc, Mutex, Weak};

/// The nodes opened in one process or daemon.
#[derive(Default)]
pub struct Graph {
    /// In the order their names were given (see [`Graph::ticket`]).
    nodes: Mutex<Vec<(u64, Weak<Node>)>>,
    next: std::sync::atomic::AtomicU64,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Arc<Graph> {
        Arc::new(Graph::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Weak<Node>)>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A node's place in the graph's order, taken when QEMU would name it
    /// (bdrv_open_common): a format after its file, before its backing file.
    pub fn ticket(&self) -> u64 {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Adds a freshly opened node, last.
    pub fn add(&self, node: &Arc<Node>) {
        self.add_at(node, self.ticket());
    }

    /// Adds a freshly opened node at the place `ticket` holds.
    pub fn add_at(&self, node: &Arc<Node>, ticket: u64) {
        let mut nodes = self.lock();
        nodes.retain(|(_, w)| w.strong_count() > 0);
        let at = nodes.partition_point(|(t, _)| *t < ticket);
        nodes.insert(at, (ticket, Arc::downgrade(node)));
    }

    /// Every open node, in the order they were named.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.lock()
            .iter()
            .filter_map(|(_, w)| w.upgrade())
            .filter(|n| !n.is_closed())
            .collect()
    }

    /// The open node called `name` (QEMU: bdrv_find_node).
    pub fn find(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes().into_iter().find(|n| n.name() == name)
    }

    /// The open node called `name`, or QEMU's error for a node-name
    /// argument that names none (qmp_blockdev_del and others).
    pub fn find_node(&self, name: &str) -> Result<Arc<Node>> {
        self.find(name)
            .ok_or_else(|| Error::invalid(format!("Failed to find node with node-name='{name}'")))
    }

    /// The open node called `name`, or QEMU's error for a reference that
    /// may name a device or a node (bdrv_lookup_bs); Strata has no devices.
    pub fn lookup(&self, name: &str) -> Result<Arc<Node>> {
        self.find(name).ok_or_else(|| {
            Error::invalid(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ))
        })
    }

    /// Checks a node name the user gave before the node is opened (QEMU:
    /// bdrv_assign_node_name): well formed, not too long, not taken.
    pub fn check_new_name(&self, name: &str) -> Result<()> {
        if name.is_empty() {
            return Ok(());
        }
        if !id_wellformed(name) {
            return Err(Error::invalid(format!("Invalid node-name: '{name}'")));
        }
        if self.find(name).is_some() {
            return Err(Error::invalid(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        // QEMU keeps node names in a 32-byte array.
        if name.len() >= 32 {
            return Err(Error::invalid("Node name too long"));
        }
        Ok(())
    }
}

/// QEMU's rule for user-given ids: a letter, then letters, digits, `-`, `.`, `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// An edge seen from its child: who the parent is and in which role it uses
/// the child.
#[derive(Clone)]
pub struct ParentLink {
    /// The parent node.
    pub parent: Weak<Node>,
    /// The parent's name when the edge was made.
    pub parent_name: String,
    /// The child's role under that parent.
    pub role: ChildRole,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_qemus_id_rule() {
        assert!(id_wellformed("base"));
        assert!(id_wellformed("a-1.b_2"));
        assert!(!id_wellformed("1abc"));
        assert!(!id_wellformed("_x"));
        assert!(!id_wellformed("a b"));
        assert!(!id_wellformed(""));
        let g = Graph::new();
        assert_eq!(
            g.check_new_name("#block001").unwrap_err().to_string(),
            "Invalid node-name: '#block001'"
        );
        assert_eq!(
            g.check_new_name(&"a".repeat(32)).unwrap_err().to_string(),
            "Node name too long"
        );
    }
}
