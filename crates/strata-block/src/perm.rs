//! QEMU's permissions between the users of a node (block.c:
//! bdrv_child_perm, bdrv_default_perms and the drivers' child_perm): each
//! edge takes some permissions on its child and shares others, by the
//! child's role and by what the parent's own users take and share; two
//! users of one node conflict when one takes what the other does not share.
//!
//! Users are parent nodes and [`Backend`](crate::Backend)s (tools, exports,
//! jobs). The checks run before the graph changes: a new user
//! ([`check_new_user`]), a new node over existing ones ([`check_attached`]),
//! and the edges an edge replacement moves ([`check_moved`]).

use crate::driver::{ChildRole, Perm};
use crate::error::{Error, Result};
use crate::node::Node;
use std::sync::Arc;

const READ: u8 = Perm::CONSISTENT_READ.0;
const WRITE: u8 = Perm::WRITE.0;
const WRITE_UNCHANGED: u8 = Perm::WRITE_UNCHANGED.0;
const RESIZE: u8 = Perm::RESIZE.0;
const ALL: u8 = Perm::ALL.0;

/// Permission names as QEMU's errors list them.
fn names(p: u8) -> String {
    (0..4)
        .filter(|b| p & (1 << b) != 0)
        .map(Perm::bit_name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// QEMU's bdrv_default_perms: what a parent takes and shares on its child
/// in `role`, given what the parent's users take and share together.
/// Drivers that differ say so in [`Driver::child_perm`](crate::Driver::child_perm).
pub fn default_child_perm(
    parent: &Node,
    role: ChildRole,
    perm: Perm,
    shared: Perm,
) -> (Perm, Perm) {
    let (perm, shared) = (perm.0, shared.0);
    let (p, s) = match role {
        ChildRole::Backing => {
            // Only read; it may change under the parent if its users allow writes.
            let mut s = READ | WRITE_UNCHANGED;
            if shared & WRITE != 0 {
                s |= WRITE | RESIZE;
            }
            (perm & READ, s)
        }
        // Children of a quorum must stay alike: no one else writes or resizes.
        ChildRole::Quorum(_) => (perm, shared & (READ | WRITE_UNCHANGED)),
        ChildRole::Image | ChildRole::Raw | ChildRole::Target => (perm, shared),
        ChildRole::File if parent.driver().is_filter() => (perm, shared),
        ChildRole::File
        | ChildRole::DataFile
        | ChildRole::Test
        | ChildRole::Header
        | ChildRole::Log => {
            let (mut p, mut s) = (perm, shared);
            if matches!(role, ChildRole::File | ChildRole::Header | ChildRole::Log) {
                // Formats read and write their metadata whatever their users do.
                if !parent.is_read_only() {
                    p |= WRITE | RESIZE;
                }
                p |= READ;
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
            (p, s)
        }
    };
    (Perm(p & ALL), Perm(s & ALL))
}

/// One user of a node as QEMU's errors name it.
#[derive(Clone, Debug)]
pub struct User {
    /// `node 'top'`, `block device 'export0'`, `an unnamed block device`.
    pub desc: String,
    /// The role it uses the node in (`backing`, `file`, `root`).
    pub role: String,
    /// What it takes.
    pub perm: Perm,
    /// What it lets others take.
    pub shared: Perm,
}

/// Extra users of some nodes, not yet in the graph: what a check asks about.
#[derive(Default, Clone)]
struct Extra<'a> {
    users: Vec<(&'a Node, User)>,
    /// Parents whose edges to a node are about to go (they move elsewhere).
    leaving: Vec<(&'a Node, usize)>,
}

impl Extra<'_> {
    fn on(&self, node: &Node) -> Vec<User> {
        self.users
            .iter()
            .filter(|(n, _)| std::ptr::eq(*n, node))
            .map(|(_, u)| u.clone())
            .collect()
    }
    fn leaves(&self, node: &Node, parent: &Node) -> bool {
        self.leaving
            .iter()
            .any(|(n, p)| std::ptr::eq(*n, node) && *p == parent as *const Node as usize)
    }
}

/// What the users of `node` take and share together.
fn cumulative(node: &Node, extra: &Extra) -> (Perm, Perm) {
    let mut perm = 0;
    let mut shared = ALL;
    for u in users_with(node, extra) {
        perm |= u.perm.0;
        shared &= u.shared.0;
    }
    (Perm(perm), Perm(shared))
}

/// The users of `node`: the extra ones of a pending check, which QEMU
/// inserts at the head of its list, then the parents newest first (QEMU's
/// list order), then its backends.
fn users_with(node: &Node, extra: &Extra) -> Vec<User> {
    let mut out = extra.on(node);
    for l in node.parents().iter().rev() {
        let Some(parent) = l.parent.upgrade() else {
            continue;
        };
        if parent.is_closed() || extra.leaves(node, &parent) {
            continue;
        }
        out.push(edge_user(&parent, l.role, extra));
    }
    out.extend(node.backend_users());
    out
}

/// What `parent`'s edge in `role` takes and shares on its child now.
pub fn edge_perm(parent: &Node, role: ChildRole) -> (Perm, Perm) {
    let u = edge_user(parent, role, &Extra::default());
    (u.perm, u.shared)
}

/// The user that `parent`'s edge in `role` is, given its own users.
fn edge_user(parent: &Node, role: ChildRole, extra: &Extra) -> User {
    let (pp, ps) = cumulative(parent, extra);
    let (perm, shared) = parent.driver().child_perm(parent, role, pp, ps);
    User {
        desc: format!("node '{}'", parent.name()),
        role: role.name(),
        perm,
        shared,
    }
}

/// QEMU's bdrv_parent_perms_conflict: the first pair of users where one
/// takes what the other does not share.
fn check_users(node: &Node, users: &[User]) -> Result<()> {
    for (i, a) in users.iter().enumerate() {
        for (j, b) in users.iter().enumerate() {
            let bad = b.perm.0 & !a.shared.0;
            if i == j || bad == 0 {
                continue;
            }
            let n = node.name();
            return Err(Error::invalid(format!(
                "Permission conflict on node '{n}': permissions '{}' are both required by {} (uses node '{n}' as '{}' child) and unshared by {} (uses node '{n}' as '{}' child).",
                names(bad),
                b.desc,
                b.role,
                a.desc,
                a.role
            )));
        }
    }
    Ok(())
}

/// Checks the users of every node under `node` (not `node` itself).
fn check_below(node: &Arc<Node>, extra: &Extra) -> Result<()> {
    for c in node.children() {
        check_users(&c.node, &users_with(&c.node, extra))?;
        check_below(&c.node, extra)?;
    }
    Ok(())
}

/// After a new node is opened over existing ones: do its edges agree with
/// the other users of the nodes it uses?
pub fn check_attached(node: &Arc<Node>) -> Result<()> {
    check_below(node, &Extra::default())
}

/// Can `user` start using `node`, and do the permissions this passes down
/// agree with the other users of the nodes below?
pub fn check_new_user(node: &Arc<Node>, user: User) -> Result<()> {
    let takes_write = user.perm.0 & (WRITE | WRITE_UNCHANGED) != 0;
    let extra = Extra {
        users: vec![(&**node, user)],
        leaving: Vec::new(),
    };
    check_users(node, &users_with(node, &extra))?;
    // Write permissions never work on read-only nodes (QEMU:
    // bdrv_node_refresh_perm), after the conflicts as QEMU checks them.
    if takes_write && node.is_read_only() {
        return Err(Error::msg(libc::EPERM, "Block node is read-only"));
    }
    check_below(node, &extra)
}

/// Can the parent edges `moved` (parents of `from`, with their roles) and
/// the backends of `from` (when `backends`) use `to` instead?
pub fn check_moved(
    from: &Arc<Node>,
    to: &Arc<Node>,
    moved: &[(Arc<Node>, ChildRole)],
    backends: bool,
) -> Result<()> {
    let mut extra = Extra::default();
    for (p, _) in moved {
        extra.leaving.push((&**from, Arc::as_ptr(p) as usize));
    }
    let mut add: Vec<User> = moved
        .iter()
        .map(|(p, role)| edge_user(p, *role, &extra))
        .collect();
    if backends {
        add.extend(from.movable_backend_users());
    }
    extra.users = add.into_iter().map(|u| (&**to, u)).collect();
    check_users(to, &users_with(to, &extra))?;
    check_below(to, &extra)
}

/// True when some user of `node` reads it as a disk, so its content may not
/// change under them (external snapshots refuse such an overlay).
pub fn is_read_consistently(node: &Node) -> bool {
    cumulative(node, &Extra::default())
        .0
        .contains(Perm::CONSISTENT_READ)
}

/// True when some user of `node` may write to it: it cannot become
/// read-only under them.
pub fn has_writer(node: &Node) -> bool {
    let (perm, _) = cumulative(node, &Extra::default());
    perm.contains(Perm::WRITE) || perm.contains(Perm::WRITE_UNCHANGED)
}
