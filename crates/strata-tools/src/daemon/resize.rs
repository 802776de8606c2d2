//! `block_resize` (QEMU: qmp_block_resize): find the node, refuse a
//! negative size, a node an operation blocks (a backing file in use), a
//! node whose users do not let it change size, and a read-only image;
//! then change its length as bdrv_co_truncate does.

use super::blockdev::Daemon;
use std::sync::Arc;
use strata_block::{BlockOp, ChildRole, Node, Preallocation};

/// Largest length a node may have (QEMU: BDRV_MAX_LENGTH).
const MAX_LENGTH: i64 = i64::MAX / (1 << 30) * (1 << 30);

/// Whether the parents of `node` let a new user resize it: none of them
/// unshares the permission (QEMU: bdrv_parent_perms_conflict for
/// BLK_PERM_RESIZE). Returns the first parent that does, newest first,
/// and the role it uses `node` in.
fn resize_unshared_by(node: &Node, except: Option<&Node>) -> Option<(String, String)> {
    for link in node.parents().iter().rev() {
        let Some(parent) = link.parent.upgrade() else {
            continue;
        };
        if parent.is_closed() || except.is_some_and(|e| std::ptr::eq(e, &*parent)) {
            continue;
        }
        if !edge_shares_resize(&parent, link.role) {
            return Some((parent.name().to_string(), link.role.name()));
        }
    }
    None
}

/// Whether `parent` shares resizing of its child in `role`: filters pass
/// on what their own parents share, backing files may change size, and
/// formats never let others resize the file their metadata describes.
fn edge_shares_resize(parent: &Node, role: ChildRole) -> bool {
    match role {
        ChildRole::Backing => true,
        ChildRole::Quorum(_) | ChildRole::Test | ChildRole::DataFile => false,
        ChildRole::Image | ChildRole::Raw => resize_unshared_by(parent, None).is_none(),
        ChildRole::File => {
            let filtered = parent.driver().is_filter()
                || (parent.format_name() == "raw" && raw_is_filter(parent));
            filtered && resize_unshared_by(parent, None).is_none()
        }
    }
}

/// A raw node without `offset` or `size` acts as a filter of its file.
fn raw_is_filter(node: &Node) -> bool {
    let own = &node.identity().full;
    !own.contains_key("offset") && !own.contains_key("size")
}

fn conflict(child: &str, user: &str, user_role: &str, parent: &str, role: &str) -> String {
    format!(
        "Permission conflict on node '{child}': permissions 'resize' are both required by {user} (uses node '{child}' as '{user_role}' child) and unshared by node '{parent}' (uses node '{child}' as '{role}' child)."
    )
}

/// Checks that `node`, and the children it passes resizing on to, can be
/// resized by a new user.
fn check_resize_perm(node: &Arc<Node>) -> Result<(), String> {
    if let Some((parent, role)) = resize_unshared_by(node, None) {
        return Err(conflict(
            node.name(),
            "an unnamed block device",
            "root",
            &parent,
            &role,
        ));
    }
    check_children(node)
}

fn check_children(node: &Arc<Node>) -> Result<(), String> {
    for c in node.children() {
        // A backing file is only read through its parent.
        if c.role == ChildRole::Backing {
            continue;
        }
        if let Some((parent, role)) = resize_unshared_by(&c.node, Some(node)) {
            let user = format!("node '{}'", node.name());
            return Err(conflict(
                c.node.name(),
                &user,
                &c.role.name(),
                &parent,
                &role,
            ));
        }
        check_children(&c.node)?;
    }
    Ok(())
}

impl Daemon {
    /// Resizes the node `node_name` (or the device `device`: the daemon has
    /// no devices) to `size` bytes.
    pub async fn block_resize(
        &self,
        device: Option<&str>,
        node_name: Option<&str>,
        size: i64,
    ) -> Result<(), String> {
        let node = node_name.and_then(|n| self.graph.find(n)).ok_or_else(|| {
            format!(
                "Cannot find device='{}' nor node-name='{}'",
                device.unwrap_or_default(),
                node_name.unwrap_or_default()
            )
        })?;
        if size < 0 {
            return Err("Parameter 'size' expects a >0 size".into());
        }
        node.check_op(BlockOp::Resize).map_err(|e| e.to_string())?;
        check_resize_perm(&node)?;
        if size > MAX_LENGTH {
            return Err(format!("offset({size}) exceeds maximum({MAX_LENGTH})"));
        }
        if node.is_read_only() {
            return Err("Image is read-only".into());
        }
        node.truncate(size as u64, Preallocation::Off)
            .await
            .map_err(|e| match e.message() {
                Some(m) => m.to_string(),
                None if e.code() == libc::ENOTSUP => {
                    "Image format driver does not support resize".to_string()
                }
                None => e.to_string(),
            })
    }
}
