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

/// A failed read in the handshake, worded as QEMU words it ("Failed to
/// read option reply: ..."; scripts filter on that start).
fn rd(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| {
        let why = match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                "Unexpected end-of-file before all data were read".to_string()
            }
            _ => format!(
                "Unable to read from socket: {}",
                strata_block::error::strerror(e.raw_os_error().unwrap_or(libc::EIO))
            ),
        };
        Error::msg(libc::EIO, format!("Failed to read {what}: {why}"))
    }
}

/// A failed write in the handshake.
fn wr(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        Error::msg(
            errno,
            format!(
                "Failed to send {what}: Unable to write to socket: {}",
                strata_block::error::strerror(errno)
            ),
        )
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
        self.w.write_all(&b).await.map_err(wr("option request"))?;
        self.w.flush().await.map_err(wr("option request"))
    }

    async fn reply(&mut self, opt: u32) -> Result<OptReply> {
        let mut h = [0u8; 20];
        self.r
            .read_exact(&mut h)
            .await
            .map_err(rd("option reply"))?;
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
        self.r
            .read_exact(&mut data)
            .await
            .map_err(rd("option reply"))?;
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

    /// Every meta context the server has for `export` (a query-less
    /// LIST_META_CONTEXT); none if it refuses.
    async fn list_contexts(&mut self, export: &str) -> Result<Vec<String>> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u32.to_be_bytes());
        self.send_opt(OPT_LIST_META_CONTEXT, &d).await?;
        let mut out = Vec::new();
        loop {
            let r = self.reply(OPT_LIST_META_CONTEXT).await?;
            match r.kind {
                REP_META_CONTEXT if r.data.len() > 4 => {
                    out.push(String::from_utf8_lossy(&r.data[4..]).into_owned())
                }
                REP_META_CONTEXT => return Err(proto_err("Meta context reply too short")),
                REP_ACK => return Ok(out),
                k if k & (1 << 31) != 0 => return Ok(Vec::new()),
                k => {
                    return Err(proto_err(format!(
                        "Unexpected reply type {k} to option LIST_META_CONTEXT"
                    )))
                }
            }
        }
    }

    /// OPT_GO (or OPT_INFO, which asks the same and stays in the option
    /// phase): Ok(false) when the server does not know it.
    async fn go(&mut self, opt: u32, export: &str, info: &mut ExportInfo) -> Result<bool> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_opt(opt, &d).await?;
        let mut have_export = false;
        loop {
            let r = self.reply(opt).await?;
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
                k if k & (1 << 31) != 0 => return Err(go_error(opt, k, &r.data)),
                k => {
                    return Err(proto_err(format!(
                        "Unexpected reply type {k} to option {opt}"
                    )))
                }
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

/// The error for a refused OPT_GO (or INFO, LIST), in QEMU's words, with what the server
/// said on a line of its own.
fn go_error(opt: u32, kind: u32, data: &[u8]) -> Error {
    let name = match opt {
        OPT_INFO => "info",
        OPT_LIST => "list",
        _ => "go",
    };
    let opt = format!("option {opt} ({name})");
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

/// What the greeting settled: newstyle (fixed or not) or oldstyle.
struct Greeting {
    fixed: bool,
    no_zeroes: bool,
    /// Oldstyle: the export's size and flags came with the greeting.
    oldstyle: Option<ExportInfo>,
}

impl<R, W> Shake<'_, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// The server's greeting and the client's flags.
    async fn greet(&mut self) -> Result<Greeting> {
        let magic = self.r.read_u64().await.map_err(rd("initial magic"))?;
        if magic != NBDMAGIC {
            return Err(proto_err(format!(
                "Bad initial magic received: 0x{magic:x}"
            )));
        }
        let magic2 = self.r.read_u64().await.map_err(rd("server magic"))?;
        if magic2 == OLDSTYLE_MAGIC {
            let mut info = ExportInfo {
                size: self.r.read_u64().await.map_err(rd("export length"))?,
                ..Default::default()
            };
            let flags = self.r.read_u32().await.map_err(rd("export flags"))?;
            if flags >> 16 != 0 {
                return Err(proto_err(format!("Unexpected export flags {flags:x}")));
            }
            info.flags = flags as u16;
            let mut pad = [0u8; 124];
            self.r
                .read_exact(&mut pad)
                .await
                .map_err(rd("reserved block"))?;
            return Ok(Greeting {
                fixed: false,
                no_zeroes: false,
                oldstyle: Some(info),
            });
        }
        if magic2 != IHAVEOPT {
            return Err(proto_err(format!(
                "Bad server magic received: 0x{magic2:x}"
            )));
        }
        let sflags = self.r.read_u16().await.map_err(rd("server flags"))?;
        let g = Greeting {
            fixed: sflags & FLAG_FIXED_NEWSTYLE != 0,
            no_zeroes: sflags & FLAG_NO_ZEROES != 0,
            oldstyle: None,
        };
        let mut cflags = 0u32;
        if g.fixed {
            cflags |= FLAG_C_FIXED_NEWSTYLE;
        }
        if g.no_zeroes {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.w
            .write_all(&cflags.to_be_bytes())
            .await
            .map_err(wr("clientflags field"))?;
        Ok(g)
    }

    /// Extended headers if the server has them, else structured replies
    /// if it has those (any refusal means "no", as in QEMU).
    async fn reply_form(&mut self, info: &mut ExportInfo) -> Result<()> {
        if self.simple_opt(OPT_EXTENDED_HEADERS).await? {
            info.extended = true;
            info.structured = true;
        } else {
            info.structured = self.simple_opt(OPT_STRUCTURED_REPLY).await?;
        }
        Ok(())
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
    let g = s.greet().await?;
    if let Some(info) = g.oldstyle {
        if !want.export.is_empty() {
            return Err(proto_err("Server does not support non-empty export names"));
        }
        return Ok(info);
    }
    let mut info = ExportInfo::default();
    if g.fixed {
        if want.structured {
            s.reply_form(&mut info).await?;
        }
        if let (true, Some(c)) = (info.structured, want.context) {
            info.context_id = s.set_context(want.export, c).await?;
        }
        if s.go(OPT_GO, want.export, &mut info).await? {
            return Ok(info);
        }
        // Without GO, a server may still serve EXPORT_NAME; the sizes
        // negotiated above are then void (the context stays: it was
        // set for this export name).
    }
    s.send_opt(OPT_EXPORT_NAME, want.export.as_bytes()).await?;
    let mut b = [0u8; 10];
    s.r.read_exact(&mut b).await.map_err(rd("export length"))?;
    info.size = be64(&b, 0);
    info.flags = be16(&b, 8);
    if !g.no_zeroes {
        let mut pad = [0u8; 124];
        s.r.read_exact(&mut pad)
            .await
            .map_err(rd("reserved block"))?;
    }
    Ok(info)
}

/// One export as a server lists it (`qemu-nbd -L`).
#[derive(Clone, Debug, Default)]
pub struct Listed {
    pub name: String,
    pub description: String,
    pub info: ExportInfo,
    /// Every meta context the server offers on it.
    pub contexts: Vec<String>,
}

/// Lists a server's exports with what `OPT_INFO` and
/// `LIST_META_CONTEXT` say of each, then leaves (`OPT_ABORT`).
pub async fn list<R, W>(r: &mut R, w: &mut W) -> Result<Vec<Listed>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut s = Shake { r, w };
    let g = s.greet().await?;
    if !g.fixed {
        return Err(proto_err("Server does not support export lists"));
    }
    let mut form = ExportInfo::default();
    s.reply_form(&mut form).await?;
    s.send_opt(OPT_LIST, &[]).await?;
    let mut out = Vec::new();
    loop {
        let r = s.reply(OPT_LIST).await?;
        match r.kind {
            REP_SERVER => {
                let n = if r.data.len() >= 4 {
                    be32(&r.data, 0) as usize
                } else {
                    usize::MAX
                };
                if n > r.data.len() - 4.min(r.data.len()) || n > MAX_STRING {
                    return Err(proto_err("incorrect option length"));
                }
                out.push(Listed {
                    name: String::from_utf8_lossy(&r.data[4..4 + n]).into_owned(),
                    description: String::from_utf8_lossy(&r.data[4 + n..]).into_owned(),
                    ..Default::default()
                });
            }
            REP_ACK => break,
            REP_ERR_UNSUP => return Err(proto_err("Server does not support export lists")),
            k if k & (1 << 31) != 0 => return Err(go_error(OPT_LIST, k, &r.data)),
            k => {
                return Err(proto_err(format!(
                    "Unexpected reply type {k} to option LIST"
                )))
            }
        }
    }
    for e in &mut out {
        e.info = ExportInfo {
            structured: form.structured,
            extended: form.extended,
            ..Default::default()
        };
        if !s.go(OPT_INFO, &e.name, &mut e.info).await? {
            continue;
        }
        if form.structured {
            e.contexts = s.list_contexts(&e.name).await?;
        }
    }
    // A courtesy goodbye; the server may answer or just close.
    let _ = s.send_opt(OPT_ABORT, &[]).await;
    Ok(out)
}
