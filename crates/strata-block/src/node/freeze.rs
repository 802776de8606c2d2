//! Frozen links (QEMU: BdrvChild.frozen, bdrv_freeze_backing_chain): a job
//! that works through a chain (stream's copy-on-read filter, commit, active
//! commit) keeps the backing and filter links from its top down to its
//! base in place until it is done, so `blockdev-reopen` cannot move a
//! backing file under it. Counted, so two holders of a link each let go.

use super::Node;
use crate::driver::ChildRole;
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Links frozen by a job, let go when dropped (QEMU:
/// bdrv_unfreeze_backing_chain): the nodes whose link was frozen, whatever
/// the chain has become since.
#[must_use = "the links thaw when this is dropped"]
pub struct FrozenChain(Vec<Arc<Node>>);

impl Drop for FrozenChain {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = n
                .frozen
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
        }
    }
}

impl Node {
    /// Freezes each backing or filter link from this node down to `base`
    /// (excluded; None: to the bottom of the chain) until the result is
    /// dropped.
    pub fn freeze_chain(self: &Arc<Self>, base: Option<&Arc<Node>>) -> FrozenChain {
        let mut nodes = Vec::new();
        let mut at = Some(Arc::clone(self));
        while let Some(n) = at {
            if base.is_some_and(|b| Arc::ptr_eq(b, &n)) {
                break;
            }
            let next = n.filter_or_cow();
            if next.is_some() {
                n.frozen.fetch_add(1, Ordering::AcqRel);
                nodes.push(Arc::clone(&n));
            }
            at = next;
        }
        FrozenChain(nodes)
    }

    /// QEMU's refusal to move this node's child in `role` while that is
    /// its frozen backing or filter link.
    pub fn check_unfrozen(&self, role: ChildRole) -> Result<()> {
        if self.frozen.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let link = if self.driver().is_filter() {
            self.children().into_iter().find(|c| c.role.is_primary())
        } else {
            self.children()
                .into_iter()
                .find(|c| c.role == ChildRole::Backing)
        };
        match link {
            Some(c) if c.role == role => Err(Error::invalid(format!(
                "Cannot change frozen '{}' link from '{}' to '{}'",
                role.name(),
                self.name,
                c.node.name()
            ))),
            _ => Ok(()),
        }
    }
}
