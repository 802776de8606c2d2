//! Putting a job's own filter over a node (QEMU: bdrv_new_open_driver +
//! bdrv_append): the node the commit and mirror jobs insert above the
//! image they work on, so every parent and user reads (and writes) through
//! it while the job runs.

use std::sync::Arc;
use strata_block::filename::Naming;
use strata_block::{replace_node, Driver, Graph, Node, NodeOptions};

/// Puts a node driven by `driver`, whose child is `below`, in the place of
/// `below` under every parent and user handle. Named `name`, or
/// automatically; named after `below` in messages, as QEMU's job filters
/// refresh their file name from their child.
pub(crate) async fn insert_filter(
    graph: &Arc<Graph>,
    below: &Arc<Node>,
    name: Option<&str>,
    driver: Box<dyn Driver>,
    read_only: bool,
) -> Result<Arc<Node>, String> {
    if let Some(n) = name {
        graph.check_new_name(n).map_err(|e| e.to_string())?;
    }
    // The driver's child cell holds `below`: that edge is a reference.
    below.add_ref();
    let node = Node::new(
        name.unwrap_or_default(),
        Naming::AsChild,
        driver,
        NodeOptions {
            read_only,
            ..NodeOptions::default()
        },
    );
    graph.add(&node);
    if let Some(home) = below.home() {
        node.move_to(Some(home)).await;
    }
    let placed = match strata_block::perm::check_attached(&node) {
        Ok(()) => replace_node(below, &node).await,
        Err(e) => Err(e),
    };
    if let Err(e) = placed {
        let _ = node.close().await;
        return Err(e.to_string());
    }
    Ok(node)
}
