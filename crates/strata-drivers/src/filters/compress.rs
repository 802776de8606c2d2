//! `compress`: a filter that turns every write into a compressed write of
//! its child (QEMU: block/filter-compress.c). Requests are whole clusters
//! of the child; the core reads, changes and writes back the rest.

use async_trait::async_trait;
use strata_block::ChildCell;
use strata_block::{
    BlockStatus, Child, ChildRole, Driver, DriverClass, Error, IoBuf, Limits, Node, OpenCtx, Opts,
    Perm, Preallocation, Result, WriteFlags,
};

/// The `compress` driver class.
pub struct CompressClass;

struct CompressDriver {
    file: ChildCell,
}

#[async_trait]
impl Driver for CompressDriver {
    fn reopen_supported(&self) -> bool {
        false
    }

    fn format_name(&self) -> &'static str {
        "compress"
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
        (perm, shared)
    }

    /// The child's cluster: a compressed write covers whole clusters.
    fn limits(&self) -> Limits {
        let child = self.file.get().limits();
        match self.file.get().driver().cluster_size() {
            Some(cs) => Limits {
                request_alignment: cs as u32,
                ..child
            },
            None => child,
        }
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn cluster_size(&self) -> Option<u64> {
        self.file.get().driver().cluster_size()
    }

    fn subcluster_size(&self) -> Option<u64> {
        self.file.get().driver().subcluster_size()
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.file.get().read(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: IoBuf, _flags: WriteFlags) -> Result<IoBuf> {
        self.file.get().write_compressed(offset, buf).await
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

#[async_trait]
impl DriverClass for CompressClass {
    fn name(&self) -> &'static str {
        "compress"
    }

    async fn create(&self, _ctx: &OpenCtx, _filename: &str, _opts: Opts) -> Result<()> {
        Err(Error::unsupported(
            "Driver 'compress' does not support image creation",
        ))
    }

    async fn open(&self, ctx: &OpenCtx, _opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let file = ctx.file()?;
        // Only formats that write compressed clusters (QEMU:
        // block_driver_can_compress).
        if !file.driver().can_compress() {
            return Err(Error::unsupported(format!(
                "Compression is not supported for underlying format: {}",
                file.format_name()
            )));
        }
        Ok(Box::new(CompressDriver {
            file: ChildCell::new(file),
        }))
    }
}
