//! Reopening a node read-write or read-only in place (QEMU:
//! bdrv_reopen_set_read_only): what a job does to the image it writes into
//! (commit's base, stream's top), and undoes when it is done.
//!
//! The node's own children follow it (the file under a format, as QEMU's
//! children that inherit their options); children others hold too (a
//! user, another parent, the monitor that added them), and backing files,
//! keep their mode. It all happens in one drained section:
//! a protocol swaps its file descriptor, a format reloads its metadata.

use super::{drained_async, Node};
use crate::driver::{ChildRole, Perm};
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What a format takes on its metadata child only while writable (see
/// `perm::default_child_perm`): the image lock follows it.
const METADATA_WRITE: Perm = Perm(Perm::WRITE.0 | Perm::RESIZE.0);

impl Node {
    /// Makes this node read-only or read-write, with the children that are
    /// its own. Going read-only is refused while a user may write to it;
    /// a failure leaves every node as it was.
    pub async fn reopen_read_only(self: &Arc<Self>, read_only: bool) -> Result<()> {
        if self.is_read_only() == read_only {
            return Ok(());
        }
        if !self.is_active() {
            return Err(Error::invalid(format!(
                "Node '{}' is inactive: it cannot be reopened",
                self.name
            )));
        }
        if read_only && crate::perm::has_writer(self) {
            return Err(Error::invalid(format!(
                "Read-only block node '{}' cannot support read-write users",
                self.name
            )));
        }
        let mut set = Vec::new();
        self.collect_reopen_set(read_only, &mut set);
        if read_only {
            // Persistent bitmaps are stored while the image is writable.
            for n in &set {
                n.store_bitmaps().await;
            }
        }
        let drain = self.component();
        drained_async(&drain, || async {
            // Children are writable before their parent writes to them, and
            // a parent has written its caches back before they stop being.
            let order: Vec<&Arc<Node>> = if read_only {
                set.iter().collect()
            } else {
                set.iter().rev().collect()
            };
            let mut done: Vec<&Arc<Node>> = Vec::new();
            for n in order {
                match n.switch_mode(read_only).await {
                    Ok(()) => done.push(n),
                    Err(e) => {
                        for d in done.into_iter().rev() {
                            let _ = d.switch_mode(!read_only).await;
                        }
                        return Err(e);
                    }
                }
            }
            Ok(())
        })
        .await
    }

    /// This node and, depth first, the children that follow it: those
    /// opened with it, that only it holds (QEMU: children that inherit
    /// from it; a node added on its own, by blockdev-add, keeps its mode),
    /// in another mode than the one wanted.
    fn collect_reopen_set(self: &Arc<Self>, read_only: bool, set: &mut Vec<Arc<Node>>) {
        set.push(Arc::clone(self));
        for c in self.children() {
            // The one reference is this node's edge.
            let own = c.node.ref_count() == 1;
            if c.role != ChildRole::Backing && own && c.node.is_read_only() != read_only {
                c.node.collect_reopen_set(read_only, set);
            }
        }
    }

    /// Switches this node alone: its driver, its flag, and the image lock
    /// of its metadata child.
    pub(crate) async fn switch_mode(self: &Arc<Self>, read_only: bool) -> Result<()> {
        if read_only {
            // The driver's own flush: the node's would wait at the drain.
            self.driver.flush().await?;
        }
        self.driver.reopen_read_only(read_only).await?;
        self.read_only.store(read_only, Ordering::Release);
        for c in self.children() {
            if !matches!(c.role, ChildRole::File | ChildRole::Header | ChildRole::Log) {
                continue;
            }
            let Some((perm, shared)) = c.node.taken_perm() else {
                continue;
            };
            let perm = if read_only {
                perm.without(METADATA_WRITE)
            } else {
                perm.with(METADATA_WRITE)
            };
            if let Err(e) = c.node.set_perm(perm, shared) {
                self.read_only.store(!read_only, Ordering::Release);
                let _ = self.driver.reopen_read_only(!read_only).await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Switches O_DIRECT for this node alone (its driver, its flag), then
    /// asks it and its parents for their limits again: the alignment
    /// O_DIRECT needs, or none. The node is drained.
    pub(crate) async fn switch_direct(self: &Arc<Self>, direct: bool) -> Result<()> {
        self.driver.reopen_direct(direct).await?;
        self.direct.store(direct, Ordering::Relaxed);
        self.refresh_limits();
        Ok(())
    }

    /// What the node's users last took and shared on its storage.
    fn taken_perm(&self) -> Option<(Perm, Perm)> {
        *self.perm.lock().unwrap_or_else(|p| p.into_inner())
    }
}
