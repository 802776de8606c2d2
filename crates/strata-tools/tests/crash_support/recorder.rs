//! A test-only filter that records every write, zero write, discard and
//! flush that completed on its file into one log shared by all its
//! instances, in the order they completed. With one under each image of a
//! chain, a cut of that log is one moment of a crash across every image,
//! which per-image logs (blklogwrites) cannot give.
//!
//! The daemon checks blockdev-add against QEMU's schema, which has no
//! driver for it; so it takes the place of `throttle` in a test's registry
//! (`Registry::register` replaces a class of the same name), and its
//! `throttle-group` option names the image it records.

use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use strata_block::options::take_str;
use strata_block::{
    BlockStatus, Child, ChildCell, ChildRole, Driver, DriverClass, Error, IoBuf, Limits, Node,
    OpenCtx, Opts, Perm, Preallocation, Result, WriteFlags,
};

/// What reached an image's file.
#[derive(Clone, Debug)]
pub enum Op {
    Write(Vec<u8>),
    Zero,
    Discard,
    Flush,
}

/// One completed request on image `image` (the recorder's `throttle-group`).
#[derive(Clone, Debug)]
pub struct Entry {
    pub image: String,
    pub offset: u64,
    pub len: u64,
    pub op: Op,
}

pub type Log = Arc<Mutex<Vec<Entry>>>;

/// The recorder's driver class, appending to `log`.
pub struct RecorderClass {
    pub log: Log,
}

struct Recorder {
    file: ChildCell,
    image: String,
    log: Log,
}

impl Recorder {
    fn push(&self, offset: u64, len: u64, op: Op) {
        self.log.lock().unwrap().push(Entry {
            image: self.image.clone(),
            offset,
            len,
            op,
        });
    }
}

#[async_trait]
impl Driver for Recorder {
    fn format_name(&self) -> &'static str {
        "throttle"
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

    fn limits(&self) -> Limits {
        self.file.get().limits()
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn growable(&self) -> bool {
        self.file.get().driver().growable()
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.file.get().read(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let len = buf.len() as u64;
        let buf = self.file.get().write(offset, buf, flags).await?;
        self.push(offset, len, Op::Write(buf.as_slice().to_vec()));
        if flags.fua {
            // Stable on completion; as a flush, a little more lenient.
            self.push(0, 0, Op::Flush);
        }
        Ok(buf)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.file.get().write_zeroes(offset, len, flags).await?;
        self.push(offset, len, Op::Zero);
        if flags.fua {
            self.push(0, 0, Op::Flush);
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.file.get().discard(offset, len).await?;
        self.push(offset, len, Op::Discard);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.file.get().flush().await?;
        self.push(0, 0, Op::Flush);
        Ok(())
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

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        self.file.get().set_perm(perm, shared)
    }

    async fn close(&self) -> Result<()> {
        self.file.get().close().await
    }
}

#[async_trait]
impl DriverClass for RecorderClass {
    fn name(&self) -> &'static str {
        "throttle"
    }

    async fn create(&self, _ctx: &OpenCtx, _filename: &str, _opts: Opts) -> Result<()> {
        Err(Error::unsupported("the recorder makes no images"))
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let image = take_str(opts, "throttle-group")?.unwrap_or_default();
        Ok(Box::new(Recorder {
            file: ChildCell::new(ctx.file()?),
            image,
            log: Arc::clone(&self.log),
        }))
    }
}
