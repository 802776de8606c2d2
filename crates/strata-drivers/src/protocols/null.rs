//! `null-co` and `null-aio`: a device of a given size that drops writes and
//! reads nothing (or zeroes with `read-zeroes=on`). Benchmarks and tests use
//! it to measure the block layer without storage; the two names exist
//! because QEMU has two implementations, and scripts name either.

use async_trait::async_trait;
use std::time::Duration;
use strata_block::options::{take_bool, take_size, take_u64};
use strata_block::{
    BlockStatus, Driver, DriverClass, Error, IoBuf, OpenCtx, Opts, Result, WriteFlags,
};

/// The `null-co` or `null-aio` driver class.
pub struct NullClass {
    name: &'static str,
}

impl NullClass {
    /// `null-co`.
    pub const CO: NullClass = NullClass { name: "null-co" };
    /// `null-aio`.
    pub const AIO: NullClass = NullClass { name: "null-aio" };
}

struct NullDriver {
    name: &'static str,
    length: u64,
    latency: Duration,
    read_zeroes: bool,
}

impl NullDriver {
    async fn delay(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

#[async_trait]
impl Driver for NullDriver {
    fn format_name(&self) -> &'static str {
        self.name
    }

    fn length(&self) -> u64 {
        self.length
    }

    fn has_info(&self) -> bool {
        false
    }

    async fn read(&self, _offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        if self.read_zeroes {
            buf.as_mut_slice().fill(0);
        }
        self.delay().await;
        Ok(buf)
    }

    async fn write(&self, _offset: u64, buf: IoBuf, _flags: WriteFlags) -> Result<IoBuf> {
        self.delay().await;
        Ok(buf)
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _flags: WriteFlags) -> Result<()> {
        self.delay().await;
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.delay().await;
        Ok(())
    }

    async fn block_status(&self, _offset: u64, len: u64) -> Result<BlockStatus> {
        // Nothing is data; with read-zeroes everything reads as zeroes.
        Ok(BlockStatus {
            zero: self.read_zeroes,
            here: true,
            ..BlockStatus::unallocated(len)
        })
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        Ok(Some(0))
    }
}

#[async_trait]
impl DriverClass for NullClass {
    fn name(&self) -> &'static str {
        self.name
    }

    fn protocol_name(&self) -> Option<&'static str> {
        Some(self.name)
    }

    fn strong_options(&self) -> &'static [&'static str] {
        &["size", "read-zeroes"]
    }

    fn exact_filename(
        &self,
        full: &Opts,
        _children: &[(strata_block::ChildRole, strata_block::filename::Identity)],
    ) -> Option<String> {
        let plain = full
            .keys()
            .all(|k| matches!(k.as_str(), "filename" | "driver" | "latency-ns"));
        Some(if plain {
            format!("{}://", self.name)
        } else {
            String::new()
        })
    }

    fn parse_filename(&self, filename: &str, _opts: &mut Opts) -> Result<()> {
        // The only file name is the protocol's own, `null-co://`.
        if filename != format!("{}://", self.name) {
            return Err(Error::invalid(format!(
                "The only allowed filename for this driver is '{}://'",
                self.name
            )));
        }
        Ok(())
    }

    async fn create(&self, _ctx: &OpenCtx, _filename: &str, _opts: Opts) -> Result<()> {
        Err(Error::unsupported(format!(
            "Driver '{}' does not support image creation",
            self.name
        )))
    }

    async fn open(&self, _ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let _ = opts.remove("filename");
        let length = take_size(opts, "size")?.unwrap_or(1 << 30);
        let latency = take_u64(opts, "latency-ns")?.unwrap_or(0);
        if latency > i64::MAX as u64 {
            return Err(Error::invalid("latency-ns is invalid"));
        }
        let read_zeroes = take_bool(opts, "read-zeroes")?.unwrap_or(false);
        Ok(Box::new(NullDriver {
            name: self.name,
            length,
            latency: Duration::from_nanos(latency),
            read_zeroes,
        }))
    }
}
