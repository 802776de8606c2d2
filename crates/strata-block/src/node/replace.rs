//! Swappable edges (QEMU: bdrv_replace_node, bdrv_append,
//! bdrv_drop_filter): a node put in the place of another under all its
//! parents and user handles, a filter inserted above a node and taken out
//! again. Each checks every permission first and changes nothing when a
//! check fails; the swap itself happens in a drained section, so no request
//! is in flight on either side while the edges move.

use super::{drained, Node};
use crate::backend::BackendLink;
use crate::driver::{Child, ChildRole};
use crate::error::{Error, Result};
use crate::perm::User;
use crate::report::error_report;
use std::sync::{Arc, Weak};

impl Node {
    pub(crate) fn add_backend(&self, link: &Arc<BackendLink>) {
        self.lock_backends().push(Arc::downgrade(link));
    }

    pub(crate) fn remove_backend(&self, link: &Arc<BackendLink>) {
        let me = Arc::as_ptr(link);
        self.lock_backends()
            .retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), me));
    }

    fn lock_backends(&self) -> std::sync::MutexGuard<'_, Vec<Weak<BackendLink>>> {
        self.backends.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn backend_links(&self) -> Vec<Arc<BackendLink>> {
        self.lock_backends()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// The user handles on this node, as permission users.
    pub fn backend_users(&self) -> Vec<User> {
        self.backend_links().iter().map(|b| b.user()).collect()
    }

    /// The user handles a swap moves to the new node: all but the jobs'
    /// holds, which stay with the node they hold (QEMU: child_job's
    /// stay_at_node).
    fn movable_backends(&self) -> Vec<Arc<BackendLink>> {
        let mut v = self.backend_links();
        v.retain(|b| !b.is_job());
        v
    }

    /// The users [`replace_node`] would move, as permission users.
    pub(crate) fn movable_backend_users(&self) -> Vec<User> {
        self.movable_backends().iter().map(|b| b.user()).collect()
    }

    /// True when nothing but users of the disk use this node: no parent
    /// node, no job's hold (QEMU: bdrv_is_root_node).
    pub fn is_root(&self) -> bool {
        self.lock_parents().is_empty() && !self.backend_links().iter().any(|b| b.is_job())
    }

    /// How many user handles use this node as their root.
    pub fn backend_count(&self) -> usize {
        self.backend_links().len()
    }

    /// Takes this filter out of the graph (QEMU: bdrv_drop_filter): its
    /// parents and user handles use its filtered child instead.
    pub async fn drop_filter(self: &Arc<Self>) -> Result<()> {
        if !self.driver.is_filter() {
            return Err(Error::invalid(format!(
                "Node '{}' is not a filter",
                self.name
            )));
        }
        let Some(child) = self.primary_child() else {
            return Err(Error::invalid(format!(
                "Filter '{}' has no child to put in its place",
                self.name
            )));
        };
        replace_node(self, &child).await
    }

    /// Puts `self`, an image without a backing file, on top of `base`
    /// (QEMU: bdrv_append): `base` becomes its backing file, and every
    /// parent and user handle of `base` uses `self` instead.
    pub async fn append_over(self: &Arc<Self>, base: &Arc<Node>) -> Result<()> {
        self.set_backing(Some(Arc::clone(base))).await?;
        // The new backing edge must agree with the other users of `base`,
        // and `base`'s users must accept `self` in its place.
        let swapped = match crate::perm::check_attached(self) {
            Ok(()) => replace_node(base, self).await,
            Err(e) => Err(e),
        };
        if let Err(e) = swapped {
            let _ = self.set_backing(None).await;
            return Err(e);
        }
        Ok(())
    }
}

/// The parents of `from` that can move to `to`: not closed, not below `to`.
fn movable_parents(from: &Arc<Node>, to: &Arc<Node>) -> Vec<(Arc<Node>, ChildRole)> {
    from.parents()
        .into_iter()
        .filter_map(|l| Some((l.parent.upgrade()?, l.role)))
        .filter(|(p, _)| !p.is_closed() && !to.reaches(p))
        .collect()
}

/// An image whose backing file name was rewritten, with the name and
/// format it stored before.
type Renamed = (Arc<Node>, Option<(String, Option<String>)>);

/// Makes every parent and user of `top` use `base`, below it in its chain,
/// so the nodes between drop out (QEMU: bdrv_drop_intermediate, at the end
/// of a commit); each image that now has `base` as its backing file stores
/// `backing_file` (default: base's name) as its name. Unlike QEMU, the
/// names are written before the graph changes: when one cannot be written,
/// the graph stays as it was and the names written so far are put back,
/// so the images and the graph never disagree. Base is flushed before the
/// first name is written.
pub async fn drop_intermediate(
    top: &Arc<Node>,
    base: &Arc<Node>,
    backing_file: Option<&str>,
    mask_protocol: bool,
) -> Result<()> {
    if Arc::ptr_eq(top, base) || !top.chain_contains(base) {
        return Err(Error::errno(libc::EIO));
    }
    let name = backing_file.map_or_else(|| base.filename().to_string(), str::to_string);
    let format = base.format_for_overlay(mask_protocol).to_string();
    let moved = movable_parents(top, base);
    crate::perm::check_moved(top, base, &moved, true)?;
    // An overlay that names base must find there what a commit copied in:
    // base is on disk before the first header says so (QEMU writes the
    // header first, and a crash or kill then loses the commit's data).
    base.flush().await?;
    let mut written: Vec<Renamed> = Vec::new();
    let put_back = |written: Vec<Renamed>| async move {
        for (o, old) in written.into_iter().rev() {
            let (file, fmt) = old.map_or((None, None), |(f, fmt)| (Some(f), fmt));
            let _ = o.update_backing_name(file.as_deref(), fmt.as_deref()).await;
        }
    };
    for (o, role) in &moved {
        if *role != ChildRole::Backing {
            continue;
        }
        let old = o.driver.backing_file();
        if let Err(e) = o.update_backing_name(Some(&name), Some(&format)).await {
            error_report(e.to_string());
            put_back(written).await;
            return Err(e);
        }
        written.push((Arc::clone(o), old));
    }
    if let Err(e) = replace_node(top, base).await {
        error_report(e.to_string());
        put_back(written).await;
        return Err(e);
    }
    Ok(())
}

/// Puts `to` in the place of `from` under every parent of `from` and every
/// user handle on it (QEMU: bdrv_replace_node). Edges from `to` itself, or
/// from nodes below it, stay (so a filter opened over `from` can be put in
/// its place). Permissions are checked, and every parent asked whether it
/// can swap the edge, before anything changes.
pub async fn replace_node(from: &Arc<Node>, to: &Arc<Node>) -> Result<()> {
    if Arc::ptr_eq(from, to) {
        return Ok(());
    }
    swap_edges(from, to, movable_parents(from, to), true).await
}

/// Puts `to` in the place of `from` as `parent`'s child in `role` alone
/// (QEMU: bdrv_set_file_or_backing_noperm for a reopen's new `file`).
pub async fn replace_child_edge(
    parent: &Arc<Node>,
    role: ChildRole,
    from: &Arc<Node>,
    to: &Arc<Node>,
) -> Result<()> {
    swap_edges(from, to, vec![(Arc::clone(parent), role)], false).await
}

/// Moves the edges `moved` (parents of `from`, with their roles), and the
/// user handles of `from` when `backends`, to `to`.
async fn swap_edges(
    from: &Arc<Node>,
    to: &Arc<Node>,
    moved: Vec<(Arc<Node>, ChildRole)>,
    with_backends: bool,
) -> Result<()> {
    for (p, role) in &moved {
        if !p.driver.can_replace_child(*role) {
            return Err(Error::unsupported(format!(
                "Cannot change the '{}' child of node '{}' (driver '{}')",
                role.name(),
                p.name,
                p.format_name()
            )));
        }
    }
    crate::perm::check_moved(from, to, &moved, with_backends)?;
    let backends = if with_backends {
        from.movable_backends()
    } else {
        Vec::new()
    };
    let mut nodes = from.component();
    for n in to.component() {
        if !nodes.iter().any(|m| Arc::ptr_eq(m, &n)) {
            nodes.push(n);
        }
    }
    let swapped = drained(&nodes, || -> Result<usize> {
        let mut refs = 0;
        for (p, role) in &moved {
            p.driver.replace_child(*role, Arc::clone(to))?;
            let old = Child::new(*role, from);
            p.detach_child(&old);
            p.attach_child(&Child::new(*role, to));
            to.add_ref();
            refs += 1;
        }
        for b in &backends {
            from.remove_backend(b);
            b.set_root(Arc::clone(to));
            to.add_backend(b);
            to.add_ref();
            refs += 1;
        }
        Ok(refs)
    })
    .await?;
    for (p, _) in &moved {
        p.refresh_limits();
        p.refresh_identity();
    }
    // The references the moved edges and handles held on `from` go.
    for _ in 0..swapped {
        from.close().await?;
    }
    Ok(())
}
