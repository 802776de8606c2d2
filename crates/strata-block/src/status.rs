//! Block status: the one primitive for "what is here".

use crate::node::Node;
use std::sync::Arc;

/// What a range of a node holds (QEMU: BDRV_BLOCK_*).
#[derive(Clone)]
pub struct BlockStatus {
    /// Length of the range this answer covers (at least 1 byte, at most what was asked).
    pub len: u64,
    /// The range reads as data from this layer or below.
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// This layer decides the content (not its backing file).
    pub allocated: bool,
    /// The data is compressed.
    pub compressed: bool,
    /// Where the bytes are, in which node: set for data that sits as-is in a child.
    pub host: Option<(Arc<Node>, u64)>,
    /// The layer passes the range through to `host` unchanged (raw, filters):
    /// ask that node instead.
    pub raw: bool,
    /// Ask `host` whether the range reads as zeroes (preallocated zero clusters).
    pub recurse: bool,
    /// The bytes are in this very node at the offset asked (protocols); the
    /// core fills in `host` with the node.
    pub here: bool,
}

impl BlockStatus {
    /// Unallocated here: the backing file (or zeroes) shows through.
    pub fn unallocated(len: u64) -> BlockStatus {
        BlockStatus {
            len,
            data: false,
            zero: false,
            allocated: false,
            compressed: false,
            host: None,
            raw: false,
            recurse: false,
            here: false,
        }
    }
    /// Allocated and reading as zeroes, with no host data.
    pub fn zero(len: u64) -> BlockStatus {
        BlockStatus {
            zero: true,
            allocated: true,
            ..BlockStatus::unallocated(len)
        }
    }
    /// Data at `host_offset` of `node`.
    pub fn data_at(len: u64, node: Arc<Node>, host_offset: u64) -> BlockStatus {
        BlockStatus {
            data: true,
            allocated: true,
            host: Some((node, host_offset)),
            ..BlockStatus::unallocated(len)
        }
    }
    /// Data that is there, without a host mapping (compressed, or a protocol).
    pub fn data(len: u64) -> BlockStatus {
        BlockStatus {
            data: true,
            allocated: true,
            ..BlockStatus::unallocated(len)
        }
    }
}

impl std::fmt::Debug for BlockStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BlockStatus(len={}, data={}, zero={}, alloc={}, host={:?})",
            self.len,
            self.data,
            self.zero,
            self.allocated,
            self.host.as_ref().map(|(n, o)| (n.name().to_string(), *o))
        )
    }
}
