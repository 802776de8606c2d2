//! Debug events and breakpoints (QEMU: BlkdebugEvent, bdrv_debug_event,
//! bdrv_debug_breakpoint): formats announce what their next I/O on a child
//! is for ("an L2 table is loaded"), so that a blkdebug node below can fail
//! that I/O or hold it until a test says go.

use crate::error::{err, Result};
use crate::node::Node;
use async_trait::async_trait;
use std::sync::Arc;

macro_rules! events {
    ($($v:ident = $s:literal,)*) => {
        /// What the next I/O of a node on its child is for, in QEMU's
        /// order (the QAPI enum BlkdebugEvent).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[allow(missing_docs)]
        pub enum DebugEvent { $($v,)* }

        impl DebugEvent {
            /// Every event, in QAPI order.
            pub const ALL: &'static [DebugEvent] = &[$(DebugEvent::$v,)*];
            /// The event's name in rule files and QMP.
            pub fn name(self) -> &'static str {
                match self { $(DebugEvent::$v => $s,)* }
            }
        }
    };
}

events! {
    L1Update = "l1_update",
    L1GrowAllocTable = "l1_grow_alloc_table",
    L1GrowWriteTable = "l1_grow_write_table",
    L1GrowActivateTable = "l1_grow_activate_table",
    L2Load = "l2_load",
    L2Update = "l2_update",
    L2UpdateCompressed = "l2_update_compressed",
    L2AllocCowRead = "l2_alloc_cow_read",
    L2AllocWrite = "l2_alloc_write",
    ReadAio = "read_aio",
    ReadBackingAio = "read_backing_aio",
    ReadCompressed = "read_compressed",
    WriteAio = "write_aio",
    WriteCompressed = "write_compressed",
    VmstateLoad = "vmstate_load",
    VmstateSave = "vmstate_save",
    CowRead = "cow_read",
    CowWrite = "cow_write",
    ReftableLoad = "reftable_load",
    ReftableGrow = "reftable_grow",
    ReftableUpdate = "reftable_update",
    RefblockLoad = "refblock_load",
    RefblockUpdate = "refblock_update",
    RefblockUpdatePart = "refblock_update_part",
    RefblockAlloc = "refblock_alloc",
    RefblockAllocHookup = "refblock_alloc_hookup",
    RefblockAllocWrite = "refblock_alloc_write",
    RefblockAllocWriteBlocks = "refblock_alloc_write_blocks",
    RefblockAllocWriteTable = "refblock_alloc_write_table",
    RefblockAllocSwitchTable = "refblock_alloc_switch_table",
    ClusterAlloc = "cluster_alloc",
    ClusterAllocBytes = "cluster_alloc_bytes",
    ClusterFree = "cluster_free",
    FlushToOs = "flush_to_os",
    FlushToDisk = "flush_to_disk",
    PwritevRmwHead = "pwritev_rmw_head",
    PwritevRmwAfterHead = "pwritev_rmw_after_head",
    PwritevRmwTail = "pwritev_rmw_tail",
    PwritevRmwAfterTail = "pwritev_rmw_after_tail",
    Pwritev = "pwritev",
    PwritevZero = "pwritev_zero",
    PwritevDone = "pwritev_done",
    EmptyImagePrepare = "empty_image_prepare",
    L1ShrinkWriteTable = "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters",
    CorWrite = "cor_write",
    ClusterAllocSpace = "cluster_alloc_space",
    None = "none",
}

impl DebugEvent {
    /// The event called `name`.
    pub fn from_name(name: &str) -> Option<DebugEvent> {
        DebugEvent::ALL.iter().copied().find(|e| e.name() == name)
    }
}

/// What a driver that takes breakpoints offers (blkdebug).
#[async_trait]
pub trait DebugHooks: Send + Sync {
    /// Suspends the next request that reaches `event`, tagging it `tag`.
    fn breakpoint(&self, event: &str, tag: &str) -> Result<()>;
    /// Removes the breakpoints tagged `tag` and resumes their requests.
    fn remove_breakpoint(&self, tag: &str) -> Result<()>;
    /// Resumes the request suspended as `tag`.
    fn resume(&self, tag: &str) -> Result<()>;
    /// True while a request tagged `tag` is suspended.
    fn is_suspended(&self, tag: &str) -> bool;
}

impl Node {
    /// Announces `event` to this node (a no-op unless it is blkdebug).
    pub async fn debug_event(&self, event: DebugEvent) {
        // Only a driver with debug hooks hears events: for every other the
        // announcement costs no call (and no boxed future) on the data path.
        if self.driver().debug_hooks().is_some() {
            self.driver().debug_event(event).await
        }
    }

    /// The first node down the primary children that takes breakpoints
    /// (QEMU: bdrv_find_debug_node).
    pub fn debug_node(self: &Arc<Self>) -> Option<Arc<Node>> {
        self.find_down(|n| n.driver().debug_hooks().is_some())
    }

    /// Runs `f` on the debug hooks below this node; ENOTSUP without any.
    pub fn with_debug_hooks<T>(
        self: &Arc<Self>,
        f: impl FnOnce(&dyn DebugHooks) -> Result<T>,
    ) -> Result<T> {
        match self.debug_node() {
            Some(n) => match n.driver().debug_hooks() {
                Some(h) => f(h),
                None => err(libc::ENOTSUP),
            },
            None => err(libc::ENOTSUP),
        }
    }
}
