//! The server's side of the fixed newstyle handshake: options until the
//! client picks an export (`OPT_GO` or `OPT_EXPORT_NAME`) or leaves.
//! Every length from the wire is bounded before anything is allocated.

use super::export::{Export, MetaContext};
use super::Server;
use crate::proto::*;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What the handshake settled for the transmission phase.
pub struct Negotiated {
    pub export: Arc<Export>,
    pub structured: bool,
    pub extended: bool,
    /// The contexts the client selected, by id.
    pub contexts: Vec<(u32, MetaContext)>,
}

/// What the client asked so far.
#[derive(Default)]
struct State {
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// The export SET_META_CONTEXT named, and what it selected there.
    meta_export: Option<String>,
    contexts: Vec<(u32, MetaContext)>,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Runs the handshake. `Ok(None)`: the client ended it (ABORT, or closed).
pub async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    server: &Server,
) -> io::Result<Option<Negotiated>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello).await?;
    w.flush().await?;
    let cflags = r.read_u32().await?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(bad(format!("Unsupported client flags 0x{cflags:x}")));
    }
    let mut st = State {
        no_zeroes: cflags & FLAG_C_NO_ZEROES != 0,
        ..Default::default()
    };
    loop {
        let magic = r.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(bad("Bad option magic"));
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION {
            return Err(bad(format!("Option length {len} is too large")));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        let mut reply = Replier { w: &mut *w, opt };
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                // No way to say no here but to close (the protocol's rule).
                let Some(export) = server.export(&name) else {
                    return Err(bad(format!("export '{name}' not present")));
                };
                let flags = transmission_flags(&export, &st);
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&export.size().to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
                if !st.no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&b).await?;
                w.flush().await?;
                let contexts = selected_for(&mut st, &name);
                return Ok(Some(Negotiated {
                    export,
                    structured: st.structured,
                    extended: st.extended,
                    contexts,
                }));
            }
            OPT_ABORT => {
                // A client may close without waiting for this; ignore errors.
                let _ = reply.send(REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply.error(REP_ERR_INVALID, "no payload expected").await?;
                    continue;
                }
                for e in server.exports() {
                    let mut b = Vec::new();
                    b.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    b.extend_from_slice(e.name.as_bytes());
                    if let Some(d) = &e.description {
                        b.extend_from_slice(d.as_bytes());
                    }
                    reply.send(REP_SERVER, &b).await?;
                }
                reply.send(REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => {
                reply.error(REP_ERR_POLICY, "TLS not configured").await?;
            }
            OPT_STRUCTURED_REPLY | OPT_EXTENDED_HEADERS => {
                let ext = opt == OPT_EXTENDED_HEADERS;
                if !data.is_empty() {
                    reply.error(REP_ERR_INVALID, "no payload expected").await?;
                } else if (ext && st.extended) || (!ext && st.structured) {
                    let what = if ext {
                        "extended headers"
                    } else {
                        "structured reply"
                    };
                    reply
                        .error(REP_ERR_INVALID, &format!("{what} already negotiated"))
                        .await?;
                } else {
                    st.structured = true;
                    st.extended |= ext;
                    reply.send(REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(reply, &data, server, &mut st).await?;
            }
            OPT_INFO | OPT_GO => {
                if let Some(n) = info(reply, &data, server, &mut st).await? {
                    return Ok(Some(n));
                }
            }
            _ => {
                let msg = format!("Unsupported option {opt}");
                reply.error(REP_ERR_UNSUP, &msg).await?;
            }
        }
    }
}

/// The transmission flags for `export` after what was negotiated.
fn transmission_flags(export: &Export, st: &State) -> u16 {
    let mut f = export.flags();
    if st.structured {
        f |= FLAG_SEND_DF;
    }
    if st.extended {
        f |= FLAG_BLOCK_STAT_PAYLOAD;
    }
    f
}

/// The contexts selected, if they were selected for this export.
fn selected_for(st: &mut State, name: &str) -> Vec<(u32, MetaContext)> {
    if st.meta_export.as_deref() == Some(name) {
        std::mem::take(&mut st.contexts)
    } else {
        Vec::new()
    }
}

/// Sends the replies of one option.
struct Replier<'a, W> {
    w: &'a mut W,
    opt: u32,
}

impl<W: AsyncWrite + Unpin> Replier<'_, W> {
    async fn send(&mut self, kind: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(20 + data.len());
        b.extend_from_slice(&REP_MAGIC.to_be_bytes());
        b.extend_from_slice(&self.opt.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.w.write_all(&b).await?;
        self.w.flush().await
    }

    /// An error reply, with a message for the client's user (as QEMU's).
    async fn error(mut self, kind: u32, msg: &str) -> io::Result<()> {
        self.send(kind, msg.as_bytes()).await
    }
}

/// A cursor over an option's payload that never reads past its end.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn u16(&mut self) -> Option<u16> {
        let v = self.b.get(..2)?;
        self.b = &self.b[2..];
        Some(u16::from_be_bytes([v[0], v[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        let v = self.b.get(..4)?;
        self.b = &self.b[4..];
        Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let v = self.b.get(..n)?;
        self.b = &self.b[n..];
        Some(v)
    }
    /// A string with a u32 length in front, at most MAX_STRING bytes.
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        Some(String::from_utf8_lossy(self.bytes(n)?).into_owned())
    }
}

/// OPT_INFO and OPT_GO; `Some` when GO picked an export.
async fn info<W: AsyncWrite + Unpin>(
    mut reply: Replier<'_, W>,
    data: &[u8],
    server: &Server,
    st: &mut State,
) -> io::Result<Option<Negotiated>> {
    let go = reply.opt == OPT_GO;
    let mut c = Cursor { b: data };
    let parsed = (|| {
        let name = c.string()?;
        let n = c.u16()?;
        let items = (0..n).map(|_| c.u16()).collect::<Option<Vec<_>>>()?;
        c.b.is_empty().then_some((name, items))
    })();
    let Some((name, items)) = parsed else {
        reply
            .error(REP_ERR_INVALID, "request data has the wrong length")
            .await?;
        return Ok(None);
    };
    let Some(export) = server.export(&name) else {
        let msg = format!("export '{name}' not present");
        reply.error(REP_ERR_UNKNOWN, &msg).await?;
        return Ok(None);
    };
    if items.contains(&INFO_NAME) {
        let mut b = INFO_NAME.to_be_bytes().to_vec();
        b.extend_from_slice(export.name.as_bytes());
        reply.send(REP_INFO, &b).await?;
    }
    if items.contains(&INFO_DESCRIPTION) {
        if let Some(d) = &export.description {
            let mut b = INFO_DESCRIPTION.to_be_bytes().to_vec();
            b.extend_from_slice(d.as_bytes());
            reply.send(REP_INFO, &b).await?;
        }
    }
    // Block sizes always (QEMU's choice): the node's alignment as the
    // minimum to a client that asked for sizes (or only looks), else 1
    // (the core pads what it must); 4 KiB preferred; the node's transfer
    // limit within the payload bound as the maximum.
    let limits = export.blk.node().limits();
    let min = if !go || items.contains(&INFO_BLOCK_SIZE) {
        limits.request_alignment.max(1)
    } else {
        1
    };
    let max = match limits.max_transfer {
        0 => MAX_BUFFER,
        m => m.min(MAX_BUFFER),
    };
    let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, min.max(4096), max as u32] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    reply.send(REP_INFO, &b).await?;
    let flags = transmission_flags(&export, st);
    let mut b = INFO_EXPORT.to_be_bytes().to_vec();
    b.extend_from_slice(&export.size().to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    reply.send(REP_INFO, &b).await?;
    reply.send(REP_ACK, &[]).await?;
    if !go {
        return Ok(None);
    }
    let contexts = selected_for(st, &name);
    Ok(Some(Negotiated {
        export,
        structured: st.structured,
        extended: st.extended,
        contexts,
    }))
}

/// OPT_LIST_META_CONTEXT and OPT_SET_META_CONTEXT.
async fn meta_context<W: AsyncWrite + Unpin>(
    mut reply: Replier<'_, W>,
    data: &[u8],
    server: &Server,
    st: &mut State,
) -> io::Result<()> {
    let set = reply.opt == OPT_SET_META_CONTEXT;
    if !st.structured {
        let msg = "request is only valid with structured replies negotiated";
        return reply.error(REP_ERR_INVALID, msg).await;
    }
    let mut c = Cursor { b: data };
    let parsed = (|| {
        let name = c.string()?;
        let n = c.u32()?;
        // Each query takes at least its length: a count past that is a lie.
        if n as usize > c.b.len() / 4 {
            return None;
        }
        let queries = (0..n).map(|_| c.string()).collect::<Option<Vec<_>>>()?;
        c.b.is_empty().then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return reply
            .error(REP_ERR_INVALID, "request data has the wrong length")
            .await;
    };
    let Some(export) = server.export(&name) else {
        let msg = format!("export '{name}' not present");
        return reply.error(REP_ERR_UNKNOWN, &msg).await;
    };
    let mut found = Vec::new();
    if queries.is_empty() && !set {
        found = export.contexts();
    }
    for q in &queries {
        for m in export.matching(q, !set) {
            if !found.iter().any(|(id, _, _)| *id == m.0) {
                found.push(m);
            }
        }
    }
    for (id, cname, _) in &found {
        let mut b = id.to_be_bytes().to_vec();
        b.extend_from_slice(cname.as_bytes());
        reply.send(REP_META_CONTEXT, &b).await?;
    }
    if set {
        st.meta_export = Some(name);
        st.contexts = found.into_iter().map(|(id, _, m)| (id, m)).collect();
    }
    reply.send(REP_ACK, &[]).await
}
