//! The `nbd` protocol driver (QEMU: block/nbd.c): a disk served by an NBD
//! server, through strata-nbd's client. Three protocol names select it
//! (`nbd`, `nbd+tcp`, `nbd+unix`), as in QEMU; block status comes from the
//! `base:allocation` context, or from the one `x-dirty-bitmap` names,
//! read as QEMU reads it.

mod address;

use async_trait::async_trait;
use strata_block::options::{take_str, take_u64};
use strata_block::{
    BlockStatus, ChildRole, Driver, DriverClass, Error, IoBuf, Limits, OpenCtx, Opts,
    Preallocation, Result, WriteFlags,
};
use strata_nbd::client::{Client, Wanted};
use strata_nbd::proto::*;

/// The `nbd` driver under one of its protocol names.
pub struct NbdClass {
    protocol: &'static str,
}

impl NbdClass {
    pub const NBD: NbdClass = NbdClass { protocol: "nbd" };
    pub const TCP: NbdClass = NbdClass {
        protocol: "nbd+tcp",
    };
    pub const UNIX: NbdClass = NbdClass {
        protocol: "nbd+unix",
    };
}

struct NbdDriver {
    client: Client,
    /// The context is `qemu:allocation-depth`: depths past 2 read as 2.
    alloc_depth: bool,
}

impl NbdDriver {
    fn has(&self, flag: u16) -> bool {
        self.client.info.flags & flag != 0
    }
}

#[async_trait]
impl Driver for NbdDriver {
    fn format_name(&self) -> &'static str {
        "nbd"
    }

    async fn reopen_read_only(&self, read_only: bool) -> Result<()> {
        if !read_only && self.has(FLAG_READ_ONLY) {
            return Err(Error::msg(
                libc::EACCES,
                "Can't reopen read-only NBD mount as read/write",
            ));
        }
        Ok(())
    }

    fn length(&self) -> u64 {
        self.client.info.size
    }

    /// QEMU's nbd_refresh_limits: the server's block sizes where it gave
    /// them; otherwise byte access where the size or block status needs
    /// it, sectors for servers too old to say.
    fn limits(&self) -> Limits {
        let info = &self.client.info;
        let mut min = info.min_block;
        if min == 0 {
            min = if !info.size.is_multiple_of(512) || info.context_id.is_some() {
                1
            } else {
                512
            };
        }
        let max = match info.max_block {
            0 => MAX_BUFFER,
            m => (m as u64).min(MAX_BUFFER),
        };
        // Zeroes and trims carry no payload: extended headers lift their
        // bound (0: none); a compact header has 32 bits of length.
        let (max_discard, max_write_zeroes) = if info.extended {
            (0, 0)
        } else {
            (i32::MAX as u64 / min as u64 * min as u64, max)
        };
        Limits {
            request_alignment: min,
            max_transfer: max,
            max_discard,
            max_write_zeroes,
            ..Limits::default()
        }
    }

    fn has_dirname(&self) -> bool {
        false
    }

    fn name_in_messages(&self) -> &'static str {
        "NBD"
    }

    /// QEMU's nbd driver has no get_info.
    fn has_info(&self) -> bool {
        false
    }

    /// The node is a whole number of sectors long; the bytes past the
    /// export's end (an odd-sized export) read as zeroes, as in QEMU.
    async fn read(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let size = self.client.info.size;
        let end = offset + buf.len() as u64;
        if end <= size {
            return self.client.read(offset, buf).await;
        }
        let have = size.saturating_sub(offset) as usize;
        buf.as_mut_slice()[have..].fill(0);
        if have == 0 {
            return Ok(buf);
        }
        let (head, tail) = buf.split_at(have);
        let head = self.client.read(offset, head).await?;
        head.join(tail).map_err(|_| Error::errno(libc::EIO))
    }

    async fn write(&self, offset: u64, buf: IoBuf, _flags: WriteFlags) -> Result<IoBuf> {
        if self.has(FLAG_READ_ONLY) {
            return Err(Error::errno(libc::EACCES));
        }
        // FUA is kept by the core's flush after the write.
        self.client.write(offset, &buf, false).await?;
        Ok(buf)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        if !self.has(FLAG_SEND_WRITE_ZEROES) {
            return Err(Error::errno(libc::ENOTSUP));
        }
        let mut f = 0;
        if !flags.may_unmap {
            f |= CMD_FLAG_NO_HOLE;
        }
        if flags.no_fallback {
            if !self.has(FLAG_SEND_FAST_ZERO) {
                return Err(Error::errno(libc::ENOTSUP));
            }
            f |= CMD_FLAG_FAST_ZERO;
        }
        self.client.write_zeroes(offset, len, f).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // A discard is advisory: a server without TRIM keeps its data.
        if !self.has(FLAG_SEND_TRIM) {
            return Ok(());
        }
        self.client.trim(offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        if !self.has(FLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.client.flush().await
    }

    /// QEMU's reading of the context, whichever it is: the first bit says
    /// "no data" (a hole, or for a dirty bitmap a dirty area), the second
    /// "reads as zeroes".
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let all_data = BlockStatus {
            data: true,
            allocated: true,
            here: true,
            ..BlockStatus::unallocated(len)
        };
        let info = &self.client.info;
        if info.context_id.is_none() {
            // Without a context everything is data (QEMU's answer too).
            return Ok(all_data);
        }
        if offset >= info.size {
            return Ok(BlockStatus {
                zero: true,
                ..BlockStatus::unallocated(len)
            });
        }
        let asked = len.min(info.size - offset);
        let asked = if info.extended {
            asked
        } else {
            asked.min(u32::MAX as u64 / 2 / 512 * 512)
        };
        let mut ext = self.client.block_status(offset, asked).await?;
        let min = info.min_block as u64;
        if min > 1 && ext.len % min != 0 {
            // An extent out of step with the server's own block size.
            if ext.len > min {
                ext.len -= ext.len % min;
            } else {
                ext.len = min;
                ext.flags = 0;
            }
        }
        if self.alloc_depth {
            ext.flags = ext.flags.min(2);
        }
        Ok(BlockStatus {
            len: ext.len.min(len),
            data: ext.flags & STATE_HOLE == 0,
            zero: ext.flags & STATE_ZERO != 0,
            ..all_data
        })
    }

    /// An export keeps its size; a shorter size than it has is fine
    /// when not exact (QEMU's rule).
    async fn truncate(&self, size: u64, exact: bool, _prealloc: Preallocation) -> Result<()> {
        let cur = self.client.info.size;
        if size != cur && exact {
            return Err(Error::unsupported("Cannot resize NBD nodes"));
        }
        if size > cur {
            return Err(Error::invalid("Cannot grow NBD nodes"));
        }
        Ok(())
    }

    async fn allocated_size(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    async fn close(&self) -> Result<()> {
        self.client.disconnect().await;
        Ok(())
    }
}

#[async_trait]
impl DriverClass for NbdClass {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn protocol_name(&self) -> Option<&'static str> {
        Some(self.protocol)
    }

    fn strong_options(&self) -> &'static [&'static str] {
        &[
            "server.",
            "export",
            "tls-creds",
            "tls-hostname",
            "path",
            "host",
            "port",
        ]
    }

    fn exact_filename(
        &self,
        full: &Opts,
        _children: &[(ChildRole, strata_block::filename::Identity)],
    ) -> Option<String> {
        Some(address::exact_filename(full))
    }

    fn parse_filename(&self, filename: &str, opts: &mut Opts) -> Result<()> {
        address::parse_filename(filename, opts)
    }

    /// An export exists already: "creating" opens it (QEMU's simple create).
    async fn create(&self, ctx: &OpenCtx, filename: &str, opts: Opts) -> Result<()> {
        strata_block::create_existing::create_on_existing(ctx, "nbd", filename, opts).await
    }

    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>> {
        let _ = opts.remove("filename");
        let (addr, export) = address::take_address(opts)?;
        if take_str(opts, "tls-creds")?.is_some() {
            return Err(Error::unsupported("TLS is not supported by this build yet"));
        }
        let _ = take_str(opts, "tls-hostname")?;
        let bitmap = take_str(opts, "x-dirty-bitmap")?;
        // Reconnection is not built: only the default (no reconnect) is taken.
        if take_u64(opts, "reconnect-delay")?.unwrap_or(0) != 0 {
            return Err(Error::unsupported("reconnect-delay is not supported yet"));
        }
        let _ = take_u64(opts, "open-timeout")?;
        if export.len() > MAX_STRING {
            return Err(Error::invalid("export name too long to send to server"));
        }
        let context = bitmap.as_deref().unwrap_or("base:allocation");
        if context.len() > MAX_STRING {
            return Err(Error::invalid(
                "x-dirty-bitmap query too long to send to server",
            ));
        }
        let want = Wanted {
            export: &export,
            structured: true,
            context: Some(context),
        };
        // Every failure to connect or negotiate is ECONNREFUSED, as in QEMU.
        let client = Client::connect(&addr, &want).await.map_err(|e| {
            Error::msg(
                libc::ECONNREFUSED,
                e.message().unwrap_or("Connection refused").to_string(),
            )
        })?;
        // QEMU's checks after the handshake lose their own words: it says
        // no more than these.
        let refused = if bitmap.is_some() && client.info.context_id.is_none() {
            Some(Error::msg(
                libc::EINVAL,
                "Could not open image: Invalid argument",
            ))
        } else if client.info.flags & FLAG_READ_ONLY != 0 && !ctx.flags.read_only {
            Some(Error::msg(
                libc::EACCES,
                "Could not open image: Permission denied",
            ))
        } else {
            None
        };
        if let Some(e) = refused {
            client.disconnect().await;
            return Err(e);
        }
        Ok(Box::new(NbdDriver {
            client,
            alloc_depth: context == "qemu:allocation-depth",
        }))
    }
}
