//! `blkverify`: runs every request on an image under test and on a raw
//! reference copy, and ends the process as soon as they disagree (QEMU:
//! block/blkverify.c). It is how a format driver is checked against the
//! plain bytes it should store.
//!
//! `blkverify:RAW:TEST` names the reference (`raw`, opened as a protocol)
//! and the image under test (`test`, probed). Reads compare the two
//! buffers; writes go to both; flushes only to the image under test.

use async_trait::async_trait;
use std::sync::Arc;
use strata_block::options::take_str;
use strata_block::{
    BlockStatus, Child, ChildRole, Driver, DriverClass, Error, IoBuf, Limits, Node, OpenCtx, Opts,
    Perm, Result, WriteFlags,
};

/// The `blkverify` driver class.
pub struct BlkverifyClass;

struct BlkverifyDriver {
    raw: Arc<Node>,
    test: Arc<Node>,
}

/// The return value QEMU compares: 0 or a negative errno.
fn ret<T>(r: &Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => -e.code(),
    }
}

/// Reports a disagreement and ends the process (QEMU: blkverify_err).
fn fail(is_write: bool, offset: u64, bytes: u64, what: std::fmt::Arguments<'_>) -> ! {
    let kind = if is_write { "write" } else { "read" };
    strata_block::stderr_line!("blkverify: {kind} offset={offset} bytes={bytes} {what}");
    strata_block::report::exit(1)
}

#[async_trait]
impl Driver for BlkverifyDriver {
    fn reopen_supported(&self) -> bool {
        false
    }

    fn format_name(&self) -> &'static str {
        "blkverify"
    }

    fn length(&self) -> u64 {
        self.test.length()
    }

    fn children(&self) -> Vec<Child> {
        // Newest first, as QEMU lists a node's children.
        vec![
            Child::new(ChildRole::Test, &self.test),
            Child::new(ChildRole::Raw, &self.raw),
        ]
    }

    fn limits(&self) -> Limits {
        let raw = self.raw.limits();
        let test = self.test.limits();
        let min_nonzero = |a: u64, b: u64| match (a, b) {
            (0, x) | (x, 0) => x,
            (a, b) => a.min(b),
        };
        Limits {
            request_alignment: 1,
            memory_alignment: raw.memory_alignment.max(test.memory_alignment),
            max_transfer: min_nonzero(raw.max_transfer, test.max_transfer),
            ..Limits::default()
        }
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn has_dirname(&self) -> bool {
        false
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len();
        let raw_buf = IoBuf::zeroed(len);
        let (t, r) = futures::join!(self.test.read(offset, buf), self.raw.read(offset, raw_buf));
        let (tr, rr) = (ret(&t), ret(&r));
        if tr != rr {
            fail(
                false,
                offset,
                len as u64,
                format_args!("return value mismatch {tr} != {rr}"),
            );
        }
        let (buf, raw_buf) = match (t, r) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) => return Err(e),
            (_, Err(e)) => return Err(e),
        };
        if let Some(i) = buf
            .as_slice()
            .iter()
            .zip(raw_buf.as_slice())
            .position(|(a, b)| a != b)
        {
            fail(
                false,
                offset,
                len as u64,
                format_args!("contents mismatch at offset {}", offset + i as u64),
            );
        }
        Ok(buf)
    }

    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let len = buf.len() as u64;
        let copy = IoBuf::from_slice(buf.as_slice());
        let (t, r) = futures::join!(
            self.test.write(offset, buf, flags),
            self.raw.write(offset, copy, flags)
        );
        let (tr, rr) = (ret(&t), ret(&r));
        if tr != rr {
            fail(
                true,
                offset,
                len,
                format_args!("return value mismatch {tr} != {rr}"),
            );
        }
        t
    }

    async fn flush(&self) -> Result<()> {
        // The reference copy need not be stable.
        self.test.flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        // QEMU's default for filters: the status of the filtered child, `raw`.
        Ok(BlockStatus {
            raw: true,
            ..BlockStatus::data_at(len, Arc::clone(&self.raw), offset)
        })
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        self.raw.set_perm(perm, shared)?;
        self.test.set_perm(perm, shared)
    }

    async fn close(&self) -> Result<()> {
        let t = self.test.close().await;
        let r = self.raw.close().await;
        t.and(r)
    }
}

#[async_trait]
impl DriverClass for BlkverifyClass {
    fn name(&self) -> &'static str {
        "blkverify"
    }

    fn exact_filename(
        &self,
        _full: &Opts,
        children: &[(ChildRole, strata_block::filename::Identity)],
    ) -> Option<String> {
        // `blkverify:RAW:TEST` when both children have plain names.
        let exact = |role| {
            children
                .iter()
                .find(|(r, _)| *r == role)
                .map(|(_, c)| c.exact.clone())
                .unwrap_or_default()
        };
        let (raw, test) = (exact(ChildRole::Raw), exact(ChildRole::Test));
        Some(if raw.is_empty() || test.is_empty() {
            String::new()
        } else {
            format!("blkverify:{raw}:{test}")
        })
    }

    fn protocol_name(&self) -> Option<&'static str> {
        Some("blkverify")
    }

    fn parse_filename(&self, filename: &str, opts: &mut Opts) -> Result<()> {
        let Some(rest) = filename.strip_prefix("blkverify:") else {
            opts.insert("x-image".into(), filename.into());
            return Ok(());
        };
        let (raw, test) = rest
            .split_once(':')
            .ok_or_else(|| Error::invalid("blkverify requires raw copy and original image path"))?;
        opts.insert("x-raw".into(), raw.into());
        opts.insert("x-image".into(), test.into());
        Ok(())
    }

    async fn create(&self, _ctx: &OpenCtx, _filename: &str, _opts: Opts) -> Result<()> {
        Err(Error::unsupported(
            "Driver 'blkverify' does not support image creation",
        ))
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let raw_name = take_str(opts, "x-raw")?;
        let test_name = take_str(opts, "x-image")?;
        let raw = ctx
            .open_child(opts, "raw", raw_name.as_deref(), ChildRole::Raw, false)
            .await?
            .ok_or_else(|| Error::invalid("A block device must be specified for \"raw\""))?;
        let test = ctx
            .open_child(opts, "test", test_name.as_deref(), ChildRole::Test, false)
            .await?
            .ok_or_else(|| Error::invalid("A block device must be specified for \"test\""))?;
        Ok(Box::new(BlkverifyDriver { raw, test }))
    }
}
