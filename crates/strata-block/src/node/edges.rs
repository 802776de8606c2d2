//! The edges between nodes (QEMU: BdrvChild and its parent lists): each
//! node knows its parents, a backing child is blocked for what its user
//! forbids, and backing files change in place.

use super::Node;
use crate::blockers::BlockOp;
use crate::driver::{Child, ChildRole};
use crate::error::{Error, Result};
use crate::graph::ParentLink;
use std::sync::Arc;

impl Node {
    /// Makes this node a parent of each of its children (QEMU:
    /// bdrv_attach_child): a backing child gets every operation blocked but
    /// those that work through a chain in use (commit into it, stream, backup).
    pub(super) fn attach_children(self: &Arc<Self>) {
        for c in self.children() {
            self.attach_child(&c);
        }
    }

    pub(super) fn attach_child(self: &Arc<Self>, c: &Child) {
        c.node.lock_parents().push(ParentLink {
            parent: Arc::downgrade(self),
            parent_name: self.name.clone(),
            role: c.role,
        });
        if c.role == ChildRole::Backing {
            let b = &self.backing_blocker;
            c.node.blockers.block_all(b);
            for op in [
                BlockOp::CommitTarget,
                BlockOp::Stream,
                BlockOp::BackupSource,
                BlockOp::BackupTarget,
            ] {
                c.node.blockers.unblock(op, b);
            }
        }
    }

    pub(super) fn detach_child(&self, c: &Child) {
        c.node
            .lock_parents()
            .retain(|p| !(std::ptr::eq(p.parent.as_ptr(), self) && p.role == c.role));
        if c.role == ChildRole::Backing {
            c.node.blockers.unblock_all(&self.backing_blocker);
        }
    }

    /// True when `target` is this node or lies anywhere below it.
    pub(crate) fn reaches(&self, target: &Node) -> bool {
        std::ptr::eq(self, target) || self.children().iter().any(|c| c.node.reaches(target))
    }

    /// Makes `backing` this node's backing file in place of the one it has
    /// (QEMU: bdrv_set_backing_hd): the node takes a reference to the new
    /// one and drops its reference to the old one; limits are refreshed.
    pub async fn set_backing(self: &Arc<Self>, backing: Option<Arc<Node>>) -> Result<()> {
        if !self.driver.supports_backing() {
            return Err(Error::invalid(format!(
                "Driver '{}' of node '{}' does not support backing files",
                self.format_name(),
                self.name
            )));
        }
        if let Some(b) = &backing {
            if b.reaches(self) {
                return Err(Error::invalid(format!(
                    "Making '{}' a backing child of '{}' would create a cycle",
                    b.name, self.name
                )));
            }
            b.add_ref();
        }
        let old = self.backing();
        if let Err(e) = self.driver.set_backing(backing.clone()) {
            if let Some(b) = &backing {
                b.close().await?;
            }
            return Err(e);
        }
        if let Some(o) = &old {
            self.detach_child(&Child {
                role: ChildRole::Backing,
                node: Arc::clone(o),
            });
        }
        if let Some(b) = backing {
            self.attach_child(&Child {
                role: ChildRole::Backing,
                node: b,
            });
        }
        self.refresh_limits();
        self.refresh_identity();
        match old {
            Some(o) => o.close().await,
            None => Ok(()),
        }
    }

    /// Undoes [`attach_children`](Self::attach_children) once this node is closed.
    pub(super) fn detach_children(&self) {
        for c in self.children() {
            c.node
                .lock_parents()
                .retain(|p| !std::ptr::eq(p.parent.as_ptr(), self));
            if c.role == ChildRole::Backing {
                c.node.blockers.unblock_all(&self.backing_blocker);
            }
        }
    }

    pub(super) fn lock_parents(&self) -> std::sync::MutexGuard<'_, Vec<ParentLink>> {
        self.parents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The edges from the nodes that use this one as a child.
    pub fn parents(&self) -> Vec<ParentLink> {
        self.lock_parents().clone()
    }

    /// Every node connected to this one through parent and child edges:
    /// what has to move between loops together (QEMU moves the same set).
    pub fn component(self: &Arc<Self>) -> Vec<Arc<Node>> {
        let mut seen: Vec<Arc<Node>> = vec![Arc::clone(self)];
        let mut i = 0;
        while i < seen.len() {
            let n = Arc::clone(&seen[i]);
            let near = n
                .children()
                .into_iter()
                .map(|c| c.node)
                .chain(n.parents().into_iter().filter_map(|p| p.parent.upgrade()));
            for m in near {
                if !seen.iter().any(|s| Arc::ptr_eq(s, &m)) {
                    seen.push(m);
                }
            }
            i += 1;
        }
        seen
    }
}
