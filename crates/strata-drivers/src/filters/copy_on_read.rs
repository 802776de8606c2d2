//! `copy-on-read`: a filter whose reads copy what they find in the backing
//! chain of its child into the child (QEMU: block/copy-on-read.c), so a
//! guest's reads populate an overlay as a stream job would.
//!
//! The copying itself is the core's (`Node::read_cor`); the filter asks for
//! it on every read. With `bottom`, only data allocated above and including
//! that node is copied; what lies below it is read without copying.

use async_trait::async_trait;
use std::sync::Arc;
use strata_block::options::take_str;
use strata_block::ChildCell;
use strata_block::{
    BlockStatus, Child, ChildRole, Driver, DriverClass, Error, IoBuf, Limits, Node, OpenCtx, Opts,
    Perm, Preallocation, Result, WriteFlags,
};

/// The `copy-on-read` driver class.
pub struct CopyOnReadClass;

struct CorDriver {
    file: ChildCell,
    /// Data below this node is not copied (QEMU: bottom_bs), with the node
    /// under it, where the copied range ends.
    bottom: Option<(Arc<Node>, Option<Arc<Node>>)>,
}

impl CorDriver {
    /// Reads without copying where the data comes from below `bottom`.
    async fn read_above_bottom(
        &self,
        bottom_base: Option<&Arc<Node>>,
        offset: u64,
        mut buf: IoBuf,
    ) -> Result<IoBuf> {
        let Some(backing) = self.file.get().backing() else {
            return self.file.get().read_cor(offset, buf).await;
        };
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let (st, _) = backing
                .block_status_above(bottom_base, pos, end - pos)
                .await?;
            let n = st.len.clamp(1, end - pos);
            let piece = IoBuf::zeroed(n as usize);
            let piece = if st.allocated || pos >= backing.length() {
                self.file.get().read_cor(pos, piece).await?
            } else {
                self.file.get().read(pos, piece).await?
            };
            let at = (pos - offset) as usize;
            buf.as_mut_slice()[at..at + n as usize].copy_from_slice(piece.as_slice());
            pos += n;
        }
        Ok(buf)
    }
}

#[async_trait]
impl Driver for CorDriver {
    fn reopen_supported(&self) -> bool {
        false
    }

    fn format_name(&self) -> &'static str {
        "copy-on-read"
    }

    fn length(&self) -> u64 {
        self.file.get().length()
    }

    fn children(&self) -> Vec<Child> {
        vec![Child::new(ChildRole::File, &self.file.get())]
    }

    fn child_cell(&self, role: ChildRole) -> Option<&ChildCell> {
        (role == ChildRole::File).then_some(&self.file)
    }

    fn child_perm(&self, _node: &Node, _role: ChildRole, perm: Perm, shared: Perm) -> (Perm, Perm) {
        // Copying backing data up is a write that changes nothing a reader sees.
        let pass = Perm::CONSISTENT_READ.0 | Perm::WRITE.0 | Perm::RESIZE.0;
        let unchanged = Perm::WRITE_UNCHANGED.0;
        (
            Perm((perm.0 & pass) | unchanged),
            Perm((shared.0 & pass) | unchanged),
        )
    }

    fn limits(&self) -> Limits {
        let child = self.file.get().limits();
        Limits {
            request_alignment: 1,
            ..child
        }
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn cluster_size(&self) -> Option<u64> {
        // A filter answers with its child's (QEMU: bdrv_co_get_info).
        self.file.get().driver().cluster_size()
    }

    fn subcluster_size(&self) -> Option<u64> {
        self.file.get().driver().subcluster_size()
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        match &self.bottom {
            None => self.file.get().read_cor(offset, buf).await,
            Some((_, base)) => self.read_above_bottom(base.as_ref(), offset, buf).await,
        }
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.file.get().write(offset, buf, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.file.get().write_zeroes(offset, len, flags).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.file.get().discard(offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        self.file.get().flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            raw: true,
            ..BlockStatus::data_at(len, self.file.get(), offset)
        })
    }

    async fn truncate(&self, size: u64, exact: bool, prealloc: Preallocation) -> Result<()> {
        self.file.get().truncate(size, exact, prealloc).await
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        self.file.get().driver().allocated_size().await
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        self.file.get().set_perm(perm, shared)
    }

    async fn close(&self) -> Result<()> {
        self.file.get().close().await
    }
}

/// The node called `name` at or below `node`.
fn find_node(node: &Arc<Node>, name: &str) -> Option<Arc<Node>> {
    if node.name() == name {
        return Some(Arc::clone(node));
    }
    node.children()
        .iter()
        .find_map(|c| find_node(&c.node, name))
}

#[async_trait]
impl DriverClass for CopyOnReadClass {
    fn name(&self) -> &'static str {
        "copy-on-read"
    }

    async fn create(&self, _ctx: &OpenCtx, _filename: &str, _opts: Opts) -> Result<()> {
        Err(Error::unsupported(
            "Driver 'copy-on-read' does not support image creation",
        ))
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let file = ctx.file()?;
        let bottom = match take_str(opts, "bottom")? {
            None => None,
            Some(name) => {
                let node = find_node(&file, &name)
                    .ok_or_else(|| Error::invalid(format!("Bottom node '{name}' not found")))?;
                if node.driver().is_filter() {
                    return Err(Error::invalid(format!("Bottom node '{name}' is a filter")));
                }
                let base = node.backing();
                Some((node, base))
            }
        };
        // Copying writes to the child even when the user only reads
        // (QEMU: BLK_PERM_WRITE_UNCHANGED).
        if ctx.flags.read_only || file.is_read_only() {
            return Err(Error::invalid("Block node is read-only"));
        }
        Ok(Box::new(CorDriver {
            file: ChildCell::new(file),
            bottom,
        }))
    }
}
