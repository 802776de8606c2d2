//! The node a commit job puts over the top image it commits (QEMU:
//! bdrv_commit_top in block/commit.c): a filter whose backing child is the
//! top image. It reads through, takes nothing from the chain below and
//! shares everything, so the image above keeps reading consistently while
//! the job writes into the chain below it, and no one else may.

use async_trait::async_trait;
use std::sync::Arc;
use strata_block::driver::{Child, ChildCell, ChildRole, Driver, Limits, Perm};
use strata_block::{BlockStatus, Error, Graph, IoBuf, Node, Result, WriteFlags};

struct CommitTop {
    top: ChildCell,
}

#[async_trait]
impl Driver for CommitTop {
    fn reopen_supported(&self) -> bool {
        false
    }

    fn format_name(&self) -> &'static str {
        "commit_top"
    }

    fn length(&self) -> u64 {
        self.top.get().length()
    }

    fn children(&self) -> Vec<Child> {
        vec![Child::new(ChildRole::Backing, &self.top.get())]
    }

    fn child_cell(&self, role: ChildRole) -> Option<&ChildCell> {
        (role == ChildRole::Backing).then_some(&self.top)
    }

    fn child_perm(
        &self,
        _node: &Node,
        _role: ChildRole,
        _perm: Perm,
        _shared: Perm,
    ) -> (Perm, Perm) {
        (Perm::NONE, Perm::ALL)
    }

    fn limits(&self) -> Limits {
        self.top.get().limits()
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn has_info(&self) -> bool {
        // QEMU asks the filtered image (bdrv_co_get_info).
        true
    }

    fn is_dirty(&self) -> bool {
        self.top.get().driver().is_dirty()
    }

    fn cluster_size(&self) -> Option<u64> {
        // A filter answers with its child's (QEMU: bdrv_co_get_info).
        self.top.get().driver().cluster_size()
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        self.top.get().driver().allocated_size().await
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.top.get().read(offset, buf).await
    }

    async fn write(&self, _offset: u64, _buf: IoBuf, _flags: WriteFlags) -> Result<IoBuf> {
        // Nothing above writes to a backing file; the job writes below.
        Err(Error::errno(libc::ENOTSUP))
    }

    async fn flush(&self) -> Result<()> {
        self.top.get().flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            raw: true,
            ..BlockStatus::data_at(len, self.top.get(), offset)
        })
    }

    async fn close(&self) -> Result<()> {
        self.top.get().close().await
    }
}

/// Puts a commit_top node over `top`: every parent and user of `top` uses
/// it instead. Named `name`, or automatically.
pub(crate) async fn insert(
    graph: &Arc<Graph>,
    top: &Arc<Node>,
    name: Option<&str>,
) -> std::result::Result<Arc<Node>, String> {
    let driver = Box::new(CommitTop {
        top: ChildCell::new(Arc::clone(top)),
    });
    // QEMU opens it with no flags: read-only, though no one writes through it.
    crate::filter_node::insert_filter(graph, top, name, driver, true).await
}
