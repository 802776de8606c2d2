//! Op blockers (QEMU: bdrv_op_block): per node and per operation type, a
//! list of reasons why the operation may not start on the node now. An
//! operation checks before it starts; whoever needs the node left alone
//! (a parent using it as its backing file, a job) blocks what it must for as
//! long as it needs to, and the error names the first reason.

use crate::error::{Error, Result};
use std::sync::{Arc, Mutex};

/// The operations a node can be blocked for, in QEMU's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockOp {
    BackupSource,
    BackupTarget,
    Change,
    CommitSource,
    CommitTarget,
    DriveDel,
    Eject,
    ExternalSnapshot,
    InternalSnapshot,
    InternalSnapshotDelete,
    MirrorSource,
    MirrorTarget,
    Resize,
    Stream,
    Replace,
}

impl BlockOp {
    /// Every operation type.
    pub const ALL: [BlockOp; 15] = [
        BlockOp::BackupSource,
        BlockOp::BackupTarget,
        BlockOp::Change,
        BlockOp::CommitSource,
        BlockOp::CommitTarget,
        BlockOp::DriveDel,
        BlockOp::Eject,
        BlockOp::ExternalSnapshot,
        BlockOp::InternalSnapshot,
        BlockOp::InternalSnapshotDelete,
        BlockOp::MirrorSource,
        BlockOp::MirrorTarget,
        BlockOp::Resize,
        BlockOp::Stream,
        BlockOp::Replace,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Why an operation is blocked. Blockers are compared by identity, so the
/// one who blocked removes exactly its own reason.
#[derive(Debug)]
pub struct Blocker {
    reason: String,
}

impl Blocker {
    /// A reason, as the error will show it after "Node 'x' is busy: ".
    pub fn new(reason: impl Into<String>) -> Arc<Blocker> {
        Arc::new(Blocker {
            reason: reason.into(),
        })
    }
    /// The reason's text.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// The blockers of one node.
#[derive(Default)]
pub struct OpBlockers {
    lists: Mutex<[Vec<Arc<Blocker>>; BlockOp::ALL.len()]>,
}

impl OpBlockers {
    fn lists(&self) -> std::sync::MutexGuard<'_, [Vec<Arc<Blocker>>; BlockOp::ALL.len()]> {
        // Lists of Arcs stay consistent even if a holder panicked.
        self.lists.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `blocker` to the reasons that block `op`.
    pub fn block(&self, op: BlockOp, blocker: &Arc<Blocker>) {
        self.lists()[op.index()].push(Arc::clone(blocker));
    }

    /// Removes `blocker` (this very one) from `op`'s reasons.
    pub fn unblock(&self, op: BlockOp, blocker: &Arc<Blocker>) {
        self.lists()[op.index()].retain(|b| !Arc::ptr_eq(b, blocker));
    }

    /// Blocks every operation for `blocker`.
    pub fn block_all(&self, blocker: &Arc<Blocker>) {
        for op in BlockOp::ALL {
            self.block(op, blocker);
        }
    }

    /// Removes `blocker` from every operation.
    pub fn unblock_all(&self, blocker: &Arc<Blocker>) {
        for op in BlockOp::ALL {
            self.unblock(op, blocker);
        }
    }

    /// The first reason blocking `op`, if any.
    pub fn first(&self, op: BlockOp) -> Option<Arc<Blocker>> {
        self.lists()[op.index()].first().cloned()
    }

    /// True when no operation is blocked.
    pub fn is_empty(&self) -> bool {
        self.lists().iter().all(Vec::is_empty)
    }

    /// Fails, naming the node and the first reason, when `op` is blocked.
    pub fn check(&self, op: BlockOp, node_name: &str) -> Result<()> {
        match self.first(op) {
            None => Ok(()),
            Some(b) => Err(Error::invalid(format!(
                "Node '{node_name}' is busy: {}",
                b.reason()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_removed_by_identity_and_the_first_one_is_named() {
        let b = OpBlockers::default();
        let one = Blocker::new("node is used as backing hd of 'top'");
        let two = Blocker::new("block device is in use by job");
        b.block_all(&one);
        b.unblock(BlockOp::CommitTarget, &one);
        b.block(BlockOp::Resize, &two);
        assert!(b.check(BlockOp::CommitTarget, "base").is_ok());
        let e = b.check(BlockOp::Resize, "base").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Node 'base' is busy: node is used as backing hd of 'top'"
        );
        b.unblock_all(&one);
        let e = b.check(BlockOp::Resize, "base").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Node 'base' is busy: block device is in use by job"
        );
        // An equal text is another blocker: removing it leaves the first.
        b.unblock(
            BlockOp::Resize,
            &Blocker::new("block device is in use by job"),
        );
        assert!(b.check(BlockOp::Resize, "base").is_err());
        b.unblock(BlockOp::Resize, &two);
        assert!(b.is_empty());
    }
}
