//! The transmission phase of a client connection: requests go out under a
//! writer lock, one reader task takes every reply off the socket and hands
//! it to the request it belongs to (by cookie). The reader owns a read's
//! buffer until its last chunk is in, so a caller that gives up early
//! never leaves the socket half read or a buffer half written.

use crate::proto::*;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use strata_block::{Error, IoBuf, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Semaphore};

/// Requests in flight on one connection (QEMU's client allows 16).
pub const MAX_IN_FLIGHT: usize = 16;

pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// One extent of a block status reply: its length and the context's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub flags: u32,
}

/// What a request gets back.
pub enum Reply {
    Done,
    Read(IoBuf),
    Status(Extent),
}

/// A request waiting for its reply, as the reader task sees it.
struct Pending {
    kind: u16,
    offset: u64,
    len: u64,
    /// The read's buffer, owned here until the last chunk.
    buf: Option<IoBuf>,
    /// Bytes of a read the chunks covered so far.
    covered: u64,
    /// The context whose extents a block status wants.
    context: u32,
    extent: Option<Extent>,
    /// The first error chunk.
    error: Option<Error>,
    tx: oneshot::Sender<Result<Reply>>,
}

/// State the requests and the reader task share.
struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    /// Set once the connection is unusable; every later request fails.
    dead: AtomicBool,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the connection: every request waiting fails with EIO, as
    /// QEMU's client fails them when its server goes away.
    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        for (_, p) in self.pending().drain() {
            let _ = p.tx.send(Err(Error::errno(libc::EIO)));
        }
    }
}

/// A connection in its transmission phase.
pub struct Conn {
    writer: tokio::sync::Mutex<Writer>,
    shared: Arc<Shared>,
    slots: Semaphore,
    cookie: AtomicU64,
    extended: bool,
}

impl Conn {
    /// Starts the reader task on the current event loop.
    pub fn start(r: Reader, w: Writer, structured: bool, extended: bool) -> Conn {
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        });
        let reader_shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut rd = ReplyReader {
                r,
                shared: &reader_shared,
                structured,
                extended,
            };
            if let Err(e) = rd.run().await {
                if !reader_shared.dead.load(Ordering::SeqCst) {
                    tracing::warn!("nbd: connection lost: {e}");
                }
            }
            reader_shared.kill();
        });
        Conn {
            writer: tokio::sync::Mutex::new(w),
            shared,
            slots: Semaphore::new(MAX_IN_FLIGHT),
            cookie: AtomicU64::new(1),
            extended,
        }
    }

    /// Sends `req` (its cookie is filled in here) with `data` for a write,
    /// and waits for its reply; a read's buffer is `read_buf`, a block
    /// status asks about meta context `context`.
    pub async fn request(
        &self,
        mut req: Request,
        data: Option<&IoBuf>,
        read_buf: Option<IoBuf>,
        context: u32,
    ) -> Result<Reply> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Error::errno(libc::EIO))?;
        if self.shared.dead.load(Ordering::SeqCst) {
            return Err(Error::errno(libc::EIO));
        }
        req.cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared.pending().insert(
            req.cookie,
            Pending {
                kind: req.kind,
                offset: req.offset,
                len: req.len,
                buf: read_buf,
                covered: 0,
                context,
                extent: None,
                error: None,
                tx,
            },
        );
        let head = req.encode(self.extended);
        let sent = {
            let mut w = self.writer.lock().await;
            send(&mut w, &head, data).await
        };
        if let Err(e) = sent {
            tracing::warn!("nbd: cannot send a request: {e}");
            self.shared.kill();
        }
        rx.await.unwrap_or_else(|_| Err(Error::errno(libc::EIO)))
    }

    /// Says goodbye (`NBD_CMD_DISC`) and closes the socket; requests still
    /// waiting fail.
    pub async fn disconnect(&self) {
        if !self.shared.dead.swap(true, Ordering::SeqCst) {
            let head = Request {
                flags: 0,
                kind: CMD_DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            }
            .encode(self.extended);
            let mut w = self.writer.lock().await;
            let _ = send(&mut w, &head, None).await;
            let _ = w.shutdown().await;
        }
        self.shared.kill();
    }
}

/// Writes a request header and its payload in one go.
async fn send(w: &mut Writer, head: &[u8], data: Option<&IoBuf>) -> io::Result<()> {
    match data {
        // Small payloads go out with the header in one system call.
        Some(d) if d.len() <= 4096 => {
            let mut b = Vec::with_capacity(head.len() + d.len());
            b.extend_from_slice(head);
            b.extend_from_slice(d.as_slice());
            w.write_all(&b).await?;
        }
        Some(d) => {
            w.write_all(head).await?;
            w.write_all(d.as_slice()).await?;
        }
        None => w.write_all(head).await?,
    }
    w.flush().await
}

fn violation(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The reader task's side: one reply header at a time.
struct ReplyReader<'a> {
    r: Reader,
    shared: &'a Shared,
    structured: bool,
    extended: bool,
}

/// A chunk's header, from either structured form.
struct ChunkHead {
    flags: u16,
    kind: u16,
    cookie: u64,
    len: u64,
}

impl ReplyReader<'_> {
    async fn run(&mut self) -> io::Result<()> {
        loop {
            let magic = self.r.read_u32().await?;
            match magic {
                SIMPLE_REPLY_MAGIC => self.simple().await?,
                STRUCTURED_REPLY_MAGIC if self.structured && !self.extended => {
                    let flags = self.r.read_u16().await?;
                    let kind = self.r.read_u16().await?;
                    let cookie = self.r.read_u64().await?;
                    let len = self.r.read_u32().await? as u64;
                    self.chunk(ChunkHead {
                        flags,
                        kind,
                        cookie,
                        len,
                    })
                    .await?
                }
                EXT_REPLY_MAGIC if self.extended => {
                    let flags = self.r.read_u16().await?;
                    let kind = self.r.read_u16().await?;
                    let cookie = self.r.read_u64().await?;
                    let _offset = self.r.read_u64().await?;
                    let len = self.r.read_u64().await?;
                    self.chunk(ChunkHead {
                        flags,
                        kind,
                        cookie,
                        len,
                    })
                    .await?
                }
                m => return Err(violation(format!("invalid reply magic 0x{m:x}"))),
            }
        }
    }

    /// Takes the request `cookie` out of the table (put back unless done).
    fn take(&self, cookie: u64) -> io::Result<Pending> {
        self.shared
            .pending()
            .remove(&cookie)
            .ok_or_else(|| violation(format!("unexpected cookie {cookie:#x}")))
    }

    fn put_back(&self, cookie: u64, p: Pending) {
        self.shared.pending().insert(cookie, p);
    }

    async fn simple(&mut self) -> io::Result<()> {
        let error = self.r.read_u32().await?;
        let cookie = self.r.read_u64().await?;
        let mut p = self.take(cookie)?;
        let chunked = p.kind == CMD_READ || p.kind == CMD_BLOCK_STATUS;
        if self.structured && chunked && error == 0 {
            // With structured replies, a read or a status succeeds in chunks only.
            return Err(violation("simple reply to a structured request"));
        }
        if error != 0 {
            let _ = p.tx.send(Err(Error::errno(wire_to_errno(error))));
            return Ok(());
        }
        let reply = match p.kind {
            CMD_READ => {
                let mut buf = p.buf.take().unwrap_or_else(|| IoBuf::zeroed(0));
                self.r.read_exact(buf.as_mut_slice()).await?;
                Reply::Read(buf)
            }
            CMD_BLOCK_STATUS => return Err(violation("simple reply to a block status")),
            _ => Reply::Done,
        };
        let _ = p.tx.send(Ok(reply));
        Ok(())
    }

    async fn chunk(&mut self, h: ChunkHead) -> io::Result<()> {
        let mut p = self.take(h.cookie)?;
        let done = h.flags & REPLY_FLAG_DONE != 0;
        match h.kind {
            REPLY_TYPE_NONE => {
                if h.len != 0 || !done {
                    return Err(violation("NONE chunk with a payload or not final"));
                }
            }
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                if p.kind != CMD_READ {
                    return Err(violation("read chunk for a request that is no read"));
                }
                self.read_chunk(&mut p, &h).await?;
            }
            REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => {
                let want = if self.extended {
                    REPLY_TYPE_BLOCK_STATUS_EXT
                } else {
                    REPLY_TYPE_BLOCK_STATUS
                };
                if p.kind != CMD_BLOCK_STATUS || h.kind != want {
                    return Err(violation("unexpected block status chunk"));
                }
                self.status_chunk(&mut p, &h).await?;
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                if h.len < 6 || h.len > 6 + MAX_STRING as u64 + 8 {
                    return Err(violation("bad error chunk length"));
                }
                let mut b = vec![0u8; h.len as usize];
                self.r.read_exact(&mut b).await?;
                let errno = be32(&b, 0);
                let mlen = be16(&b, 4) as usize;
                let extra = if h.kind == REPLY_TYPE_ERROR_OFFSET {
                    8
                } else {
                    0
                };
                if 6 + mlen + extra != b.len() || errno == 0 {
                    return Err(violation("malformed error chunk"));
                }
                let msg = String::from_utf8_lossy(&b[6..6 + mlen]).into_owned();
                if !msg.is_empty() {
                    tracing::debug!("nbd: server reported: {msg}");
                }
                p.error.get_or_insert(Error::errno(wire_to_errno(errno)));
            }
            k if k & (1 << 15) != 0 => {
                // An error type we do not know: still an error (the protocol's rule).
                self.skip(h.len).await?;
                p.error.get_or_insert(Error::errno(libc::EINVAL));
            }
            k => return Err(violation(format!("unknown chunk type {k}"))),
        }
        if !done {
            self.put_back(h.cookie, p);
            return Ok(());
        }
        let result = match p.error.take() {
            Some(e) => Err(e),
            None => match p.kind {
                CMD_READ if p.covered != p.len => {
                    return Err(violation("read reply does not cover the request"))
                }
                CMD_READ => Ok(Reply::Read(
                    p.buf.take().unwrap_or_else(|| IoBuf::zeroed(0)),
                )),
                CMD_BLOCK_STATUS => match p.extent {
                    Some(e) => Ok(Reply::Status(e)),
                    None => return Err(violation("no extent for the context asked")),
                },
                _ => Ok(Reply::Done),
            },
        };
        let _ = p.tx.send(result);
        Ok(())
    }

    /// An OFFSET_DATA or OFFSET_HOLE chunk, checked to lie in its request.
    async fn read_chunk(&mut self, p: &mut Pending, h: &ChunkHead) -> io::Result<()> {
        let hole = h.kind == REPLY_TYPE_OFFSET_HOLE;
        let want = if hole { 12 } else { 8 };
        if h.len < want || (hole && h.len != 12) {
            return Err(violation("read chunk too short"));
        }
        let offset = self.r.read_u64().await?;
        let n = if hole {
            self.r.read_u32().await? as u64
        } else {
            h.len - 8
        };
        // The server's offset may be anything: no sum of it may wrap.
        let end = offset.checked_add(n);
        if n == 0 || offset < p.offset || end.is_none_or(|e| e > p.offset + p.len) {
            return Err(violation("read chunk outside its request"));
        }
        let at = (offset - p.offset) as usize;
        let Some(buf) = p.buf.as_mut() else {
            return Err(violation("read chunk without a buffer"));
        };
        let dst = &mut buf.as_mut_slice()[at..at + n as usize];
        if hole {
            dst.fill(0);
        } else {
            self.r.read_exact(dst).await?;
        }
        p.covered += n;
        Ok(())
    }

    /// A block status chunk: the first extent of the context asked for.
    async fn status_chunk(&mut self, p: &mut Pending, h: &ChunkHead) -> io::Result<()> {
        let (head, each) = if self.extended { (8, 16) } else { (4, 8) };
        if h.len < head + each || !(h.len - head).is_multiple_of(each) {
            return Err(violation("malformed block status chunk"));
        }
        let id = self.r.read_u32().await?;
        if self.extended {
            let _count = self.r.read_u32().await?;
        }
        let (len, flags) = if self.extended {
            let len = self.r.read_u64().await?;
            (len, self.r.read_u64().await? as u32)
        } else {
            let len = self.r.read_u32().await? as u64;
            (len, self.r.read_u32().await?)
        };
        // REQ_ONE asked for one extent; others are read and dropped.
        self.skip(h.len - head - each).await?;
        if id != p.context {
            return Err(violation(format!("status for context {id}, not asked")));
        }
        if len == 0 {
            return Err(violation("block status extent of zero length"));
        }
        if p.extent.is_some() {
            return Err(violation("two status chunks for one context"));
        }
        // A longer answer than asked is cut to the request.
        p.extent = Some(Extent {
            len: len.min(p.len),
            flags,
        });
        Ok(())
    }

    /// Reads and drops `n` bytes without allocating them all.
    async fn skip(&mut self, mut n: u64) -> io::Result<()> {
        let mut sink = [0u8; 4096];
        while n > 0 {
            let k = n.min(sink.len() as u64) as usize;
            self.r.read_exact(&mut sink[..k]).await?;
            n -= k as u64;
        }
        Ok(())
    }
}
