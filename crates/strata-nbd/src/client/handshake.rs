//! The client's side of the handshake (QEMU: nbd/client.c): newstyle
//! (fixed or not) or oldstyle; extended headers or structured replies; the
//! one meta context the driver reads block status from; `OPT_GO` with the
//! block size constraints, or `OPT_EXPORT_NAME` from servers without it.
//! Every length the server sends is bounded before it is allocated.

use crate::proto::*;
use strata_block::{Error, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What the client asks for.
pub struct Wanted<'a> {
    pub export: &'a str,
    /// Ask for structured replies (extended headers first); without them
    /// reads come back whole and there is no block status.
    pub structured: bool,
    /// The meta context block status reads (`base:allocation`, or the
    /// `x-dirty-bitmap` option's); None: none.
    pub context: Option<&'a str>,
}

/// What the server settled.
#[derive(Clone, Debug, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// Block size constraints (0: the server gave none).
    pub min_block: u32,
    pub opt_block: u32,
    pub max_block: u32,
    pub structured: bool,
    pub extended: bool,
    /// The id of the meta context asked for, if the server has it.
    pub context_id: Option<u32>,
}

/// The second magic of an oldstyle server.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// Longest option reply taken (QEMU bounds them the same way).
const MAX_REPLY: u32 = 32 << 20;

fn proto_err(msg: impl Into<String>) -> Error {
    Error::msg(libc::EINVAL, msg)
}

fn io_err(e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::msg(
            libc::EIO,
            "Failed to read initial magic: Unexpected end-of-file before all data were read",
        ),
        _ => Error::msg(e.raw_os_error().unwrap_or(libc::EIO), e.to_string()),
    }
}

/// An option reply's header and payload.
struct OptReply {
    opt: u32,
    kind: u32,
    data: Vec<u8>,
}

struct Shake<'a, R, W> {
    r: &'a mut R,
    w: &'a mut W,
}

impl<R, W> Shake<'_, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn send_opt(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.w.write_all(&b).await.map_err(io_err)?;
        self.w.flush().await.map_err(io_err)
    }

    async fn reply(&mut self, opt: u32) -> Result<OptReply> {
        let mut h = [0u8; 20];
        self.r.read_exact(&mut h).await.map_err(io_err)?;
        if be64(&h, 0) != REP_MAGIC {
            return Err(proto_err("Unexpected option reply magic"));
        }
        let ropt = be32(&h, 8);
        let kind = be32(&h, 12);
        let len = be32(&h, 16);
        if ropt != opt {
            return Err(proto_err(format!(
                "Unexpected option type {ropt} (expected {opt})"
            )));
        }
        if len > MAX_REPLY {
            return Err(proto_err(format!(
                "server option reply length {len} too long"
            )));
        }
        let mut data = vec![0u8; len as usize];
        self.r.read_exact(&mut data).await.map_err(io_err)?;
        Ok(OptReply {
            opt: ropt,
            kind,
            data,
        })
    }

    /// An option that the server acknowledges or refuses: Ok(true) on ACK,
    /// Ok(false) when unsupported or refused by policy.
    async fn simple_opt(&mut self, opt: u32) -> Result<bool> {
        self.send_opt(opt, &[]).await?;
        let r = self.reply(opt).await?;
        match r.kind {
            REP_ACK if r.data.is_empty() => Ok(true),
            REP_ACK => Err(proto_err("Server sent an ACK with a payload")),
            k if k & (1 << 31) != 0 => Ok(false),
            k => Err(proto_err(format!(
                "Unexpected reply type {k} to option {opt}"
            ))),
        }
    }

    /// SET_META_CONTEXT for one context: its id, or None if the server
    /// does not have it.
    async fn set_context(&mut self, export: &str, context: &str) -> Result<Option<u32>> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(context.len() as u32).to_be_bytes());
        d.extend_from_slice(context.as_bytes());
        self.send_opt(OPT_SET_META_CONTEXT, &d).await?;
        let mut id = None;
        loop {
            let r = self.reply(OPT_SET_META_CONTEXT).await?;
            match r.kind {
                REP_META_CONTEXT => {
                    if r.data.len() < 4 {
                        return Err(proto_err("Meta context reply too short"));
                    }
                    let name = &r.data[4..];
                    if name != context.as_bytes() || id.is_some() {
                        return Err(proto_err(format!(
                            "Unexpected context name '{}'",
                            String::from_utf8_lossy(name)
                        )));
                    }
                    id = Some(be32(&r.data, 0));
                }
                REP_ACK => return Ok(id),
                k if k & (1 << 31) != 0 => return Ok(None),
                k => {
                    return Err(proto_err(format!(
                        "Unexpected reply type {k} to option {}",
                        r.opt
                    )))
                }
            }
        }
    }

    /// OPT_GO: Ok(false) when the server does not know it (use EXPORT_NAME).
    async fn go(&mut self, export: &str, info: &mut ExportInfo) -> Result<bool> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_opt(OPT_GO, &d).await?;
        let mut have_export = false;
        loop {
            let r = self.reply(OPT_GO).await?;
            match r.kind {
                REP_INFO => {
                    if r.data.len() < 2 {
                        return Err(proto_err("Info reply too short"));
                    }
                    match (be16(&r.data, 0), r.data.len()) {
                        (INFO_EXPORT, 12) => {
                            info.size = be64(&r.data, 2);
                            info.flags = be16(&r.data, 10);
                            have_export = true;
                        }
                        (INFO_EXPORT, _) => return Err(proto_err("Bad export info length")),
                        (INFO_BLOCK_SIZE, 14) => {
                            info.min_block = be32(&r.data, 2);
                            info.opt_block = be32(&r.data, 6);
                            info.max_block = be32(&r.data, 10);
                        }
                        (INFO_BLOCK_SIZE, _) => {
                            return Err(proto_err("Bad block size info length"))
                        }
                        // Names and descriptions the driver has no use for.
                        _ => {}
                    }
                }
                REP_ACK => {
                    if !have_export {
                        return Err(proto_err("broken server omitted NBD_INFO_EXPORT"));
                    }
                    if info.min_block != 0 || info.opt_block != 0 || info.max_block != 0 {
                        check_block_sizes(info)?;
                    }
                    return Ok(true);
                }
                REP_ERR_UNSUP => return Ok(false),
                k if k & (1 << 31) != 0 => return Err(go_error(k, &r.data)),
                k => return Err(proto_err(format!("Unexpected reply type {k} to option GO"))),
            }
        }
    }
}

/// The server's sizes must make sense before the driver leans on them
/// (QEMU's checks and words; a minimum past 64 KiB is refused too, since
/// the driver aligns requests to it).
fn check_block_sizes(info: &ExportInfo) -> Result<()> {
    let (min, opt, max) = (info.min_block, info.opt_block, info.max_block);
    if !min.is_power_of_two() || min > 64 << 10 {
        return Err(proto_err(format!(
            "server minimum block size {min} is not a power of two"
        )));
    }
    if !opt.is_power_of_two() || opt < min {
        return Err(proto_err(format!(
            "server preferred block size {opt} is not valid"
        )));
    }
    if max < min {
        return Err(proto_err(format!(
            "server maximum block size {max} is not valid"
        )));
    }
    if !info.size.is_multiple_of(min as u64) {
        return Err(proto_err(format!(
            "export size {} is not multiple of minimum block size {min}",
            info.size
        )));
    }
    Ok(())
}

/// The error for a refused OPT_GO, in QEMU's words, with what the server
/// said on a line of its own.
fn go_error(kind: u32, data: &[u8]) -> Error {
    let opt = "option 7 (go)";
    let what = match kind {
        REP_ERR_POLICY => format!("Denied by server for {opt}"),
        REP_ERR_INVALID => format!("Invalid parameters for {opt}"),
        REP_ERR_PLATFORM => format!("Server lacks support for {opt}"),
        REP_ERR_TLS_REQD => {
            format!("TLS negotiation required before {opt}\nDid you forget a valid tls-creds?")
        }
        REP_ERR_UNKNOWN => "Requested export not available".to_string(),
        REP_ERR_SHUTDOWN => format!("Server shutting down before {opt}"),
        REP_ERR_BLOCK_SIZE_REQD => format!("Server requires INFO_BLOCK_SIZE for {opt}"),
        _ => format!("Unknown error code when asking for {opt}"),
    };
    let said = String::from_utf8_lossy(&data[..data.len().min(MAX_STRING)]);
    if said.is_empty() {
        Error::invalid(what)
    } else {
        Error::invalid(format!("{what}\nserver reported: {said}"))
    }
}

/// Runs the handshake on a fresh connection.
pub async fn negotiate<R, W>(r: &mut R, w: &mut W, want: &Wanted<'_>) -> Result<ExportInfo>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if want.export.len() > MAX_STRING {
        return Err(proto_err("export name too long to send to server"));
    }
    let mut s = Shake { r, w };
    let magic = s.r.read_u64().await.map_err(io_err)?;
    if magic != NBDMAGIC {
        return Err(proto_err("Server sent invalid magic value"));
    }
    let magic2 = s.r.read_u64().await.map_err(io_err)?;
    let mut info = ExportInfo::default();
    if magic2 == OLDSTYLE_MAGIC {
        if !want.export.is_empty() {
            return Err(proto_err("Server does not support non-empty export names"));
        }
        info.size = s.r.read_u64().await.map_err(io_err)?;
        let flags = s.r.read_u32().await.map_err(io_err)?;
        info.flags = flags as u16;
        let mut pad = [0u8; 124];
        s.r.read_exact(&mut pad).await.map_err(io_err)?;
        return Ok(info);
    }
    if magic2 != IHAVEOPT {
        return Err(proto_err("Bad server magic received"));
    }
    let sflags = s.r.read_u16().await.map_err(io_err)?;
    let fixed = sflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = sflags & FLAG_NO_ZEROES != 0;
    let mut cflags = 0u32;
    if fixed {
        cflags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.w.write_all(&cflags.to_be_bytes()).await.map_err(io_err)?;
    if fixed {
        if want.structured {
            if s.simple_opt(OPT_EXTENDED_HEADERS).await? {
                info.extended = true;
                info.structured = true;
            } else {
                info.structured = s.simple_opt(OPT_STRUCTURED_REPLY).await?;
            }
        }
        if let (true, Some(c)) = (info.structured, want.context) {
            info.context_id = s.set_context(want.export, c).await?;
        }
        if s.go(want.export, &mut info).await? {
            return Ok(info);
        }
        // Without GO, a server may still serve EXPORT_NAME; the context
        // and sizes negotiated above are then void.
        info.context_id = None;
    } else if want.context.is_some() && want.structured {
        // An old server: no structured replies and no block status.
    }
    s.send_opt(OPT_EXPORT_NAME, want.export.as_bytes()).await?;
    let mut b = [0u8; 10];
    s.r.read_exact(&mut b).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::msg(libc::EINVAL, "Failed to read export length")
        } else {
            io_err(e)
        }
    })?;
    info.size = be64(&b, 0);
    info.flags = be16(&b, 8);
    if !no_zeroes {
        let mut pad = [0u8; 124];
        s.r.read_exact(&mut pad).await.map_err(io_err)?;
    }
    Ok(info)
}
