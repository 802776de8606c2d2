//! QEMU's permissions between the users of a node (block.c:
//! bdrv_child_perm and the drivers' child_perm), as far as the daemon's
//! graph needs them: each edge takes some permissions on its child and
//! shares others, by the child's role and by what the parent's own users
//! take and share; two users of one node conflict when one takes what the
//! other does not share. Checked when blockdev-add attaches existing nodes
//! to a new one and when block_resize wants a node's size to change.

use std::sync::Arc;
use strata_block::{ChildRole, Node};

const CONSISTENT_READ: u8 = 1;
const WRITE: u8 = 2;
const WRITE_UNCHANGED: u8 = 4;
/// Changing the node's length.
pub const RESIZE: u8 = 8;
const GRAPH_MOD: u8 = 16;
const ALL: u8 = 31;
/// What filters pass on from their users to their child.
const PASSTHROUGH: u8 = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE;

/// Permission names as QEMU's errors list them.
fn names(p: u8) -> String {
    [
        (CONSISTENT_READ, "consistent read"),
        (WRITE, "write"),
        (WRITE_UNCHANGED, "write unchanged"),
        (RESIZE, "resize"),
        (GRAPH_MOD, "change children"),
    ]
    .iter()
    .filter(|(b, _)| p & b != 0)
    .map(|(_, n)| *n)
    .collect::<Vec<_>>()
    .join(", ")
}

/// A raw node without `offset` or `size` acts as a filter of its file.
fn raw_is_filter(node: &Node) -> bool {
    let own = &node.identity().full;
    !own.contains_key("offset") && !own.contains_key("size")
}

/// What `parent` takes and shares on its child in `role`, given what the
/// parent's users take and share together.
fn edge(parent: &Node, role: ChildRole, perm: u8, shared: u8) -> (u8, u8) {
    let filter = (
        perm & PASSTHROUGH,
        (shared & PASSTHROUGH) | (ALL & !PASSTHROUGH),
    );
    match role {
        ChildRole::Backing => {
            // Only read; it may change under the parent if its users allow writes.
            let mut s = CONSISTENT_READ | WRITE_UNCHANGED;
            if shared & WRITE != 0 {
                s |= WRITE | RESIZE;
            }
            (perm & CONSISTENT_READ, s)
        }
        ChildRole::Image | ChildRole::Raw => filter,
        // Children of a quorum must stay alike: no one else writes or resizes.
        ChildRole::Quorum(_) => (
            perm & PASSTHROUGH,
            (shared & (CONSISTENT_READ | WRITE_UNCHANGED)) | (ALL & !PASSTHROUGH),
        ),
        ChildRole::File if parent.format_name() == "copy-on-read" => {
            let pass = CONSISTENT_READ | WRITE | RESIZE;
            (
                (perm & pass) | WRITE_UNCHANGED,
                (shared & pass) | (ALL & !pass),
            )
        }
        ChildRole::File if parent.driver().is_filter() => filter,
        ChildRole::File if parent.format_name() == "raw" && raw_is_filter(parent) => filter,
        ChildRole::File | ChildRole::DataFile | ChildRole::Test => {
            let (mut p, mut s) = filter;
            let raw = parent.format_name() == "raw";
            if role == ChildRole::File && !raw {
                // Formats read and write their metadata whatever their users do.
                if !parent.is_read_only() {
                    p |= WRITE | RESIZE;
                }
                p |= CONSISTENT_READ;
                s &= !(WRITE | RESIZE);
            }
            // Data may not change size under the format.
            s &= !RESIZE;
            if p & WRITE_UNCHANGED != 0 {
                p |= WRITE;
            }
            if p & WRITE != 0 {
                p |= RESIZE;
            }
            if raw {
                p = (p & !(WRITE | RESIZE)) | (perm & (WRITE | RESIZE));
            }
            (p, s)
        }
    }
}

/// A user of a node as QEMU's errors name it.
struct User {
    desc: String,
    role: String,
    perm: u8,
    shared: u8,
}

/// Extra permissions a new user of one node will take (block_resize).
type Boost<'a> = Option<(&'a Node, u8)>;

/// What the users of `node` take and share together.
fn cumulative(node: &Node, boost: Boost) -> (u8, u8) {
    let mut perm = match boost {
        Some((n, p)) if std::ptr::eq(n, node) => p,
        _ => 0,
    };
    let mut shared = ALL;
    for u in users(node, boost) {
        perm |= u.perm;
        shared &= u.shared;
    }
    (perm, shared)
}

/// The parents of `node`, newest first (QEMU's list order).
fn users(node: &Node, boost: Boost) -> Vec<User> {
    let mut out = Vec::new();
    for l in node.parents().iter().rev() {
        let Some(parent) = l.parent.upgrade() else {
            continue;
        };
        if parent.is_closed() {
            continue;
        }
        let (pp, ps) = cumulative(&parent, boost);
        let (perm, shared) = edge(&parent, l.role, pp, ps);
        out.push(User {
            desc: format!("node '{}'", parent.name()),
            role: l.role.name(),
            perm,
            shared,
        });
    }
    out
}

/// QEMU's bdrv_parent_perms_conflict: the first pair of users where one
/// takes what the other does not share.
fn check_users(node: &Node, users: &[User]) -> Result<(), String> {
    for (i, a) in users.iter().enumerate() {
        for (j, b) in users.iter().enumerate() {
            let bad = b.perm & !a.shared;
            if i == j || bad == 0 {
                continue;
            }
            let n = node.name();
            return Err(format!(
                "Permission conflict on node '{n}': permissions '{}' are both required by {} (uses node '{n}' as '{}' child) and unshared by {} (uses node '{n}' as '{}' child).",
                names(bad),
                b.desc,
                b.role,
                a.desc,
                a.role
            ));
        }
    }
    Ok(())
}

/// Checks the users of every node under `node` (not `node` itself).
fn check_below(node: &Arc<Node>, boost: Boost) -> Result<(), String> {
    for c in node.children() {
        check_users(&c.node, &users(&c.node, boost))?;
        check_below(&c.node, boost)?;
    }
    Ok(())
}

/// After a new node is opened over existing ones: do its edges agree with
/// the other users of the nodes it uses?
pub fn check_attached(node: &Arc<Node>) -> Result<(), String> {
    check_below(node, None)
}

/// Can a new user (QEMU: the BlockBackend of block_resize) take `perm` on
/// `node`, sharing everything, and do the permissions this passes down
/// agree with the other users of the nodes below?
pub fn check_new_user(node: &Arc<Node>, perm: u8) -> Result<(), String> {
    let mut all = vec![User {
        desc: "an unnamed block device".into(),
        role: "root".into(),
        perm,
        shared: ALL,
    }];
    all.extend(users(node, None));
    check_users(node, &all)?;
    check_below(node, Some((node, perm)))
}

/// True when some user of `node` reads it as a disk, so its content may not
/// change under them (external snapshots refuse such an overlay).
pub fn is_read_consistently(node: &Node) -> bool {
    cumulative(node, None).0 & CONSISTENT_READ != 0
}
