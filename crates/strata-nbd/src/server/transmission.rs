//! The transmission phase: a reader that frames requests, a loop that runs
//! up to `MAX_REQUESTS` of them at once and writes their replies. A client
//! that stops reading its replies stops being read from: memory stays
//! bounded by the request count and a byte budget, whatever it sends.

use super::commands::handle;
use super::handshake::Negotiated;
use super::reply::{Chunk, Form};
use crate::proto::*;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use std::io;
use std::sync::Arc;
use strata_block::IoBuf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Requests one client may have in flight (as QEMU's server).
pub const MAX_REQUESTS: usize = 16;
/// Payload bytes (write data and read replies, from the request's arrival
/// until its reply is written) one client may have in flight, in KiB: 1 MiB
/// keeps 16 requests of 64 KiB going, and nbdcopy or a 1 MiB sequential
/// reader as fast as 2 MiB did, while a server with many clients stays small.
const BUDGET_KIB: u32 = 1 << 10;

/// A framed request from the reader.
pub struct Incoming {
    pub req: Request,
    /// The data of a write.
    pub payload: Option<IoBuf>,
    /// Longer than the server takes: refused without being read.
    pub too_long: bool,
    /// The request's share of the budget, held until its reply is written.
    pub budget: Option<OwnedSemaphorePermit>,
}

/// Socket buffer of each direction: a deep queue's requests come in, and
/// the replies that finished together go out, in one system call each
/// (larger payloads pass by it).
const SOCKET_BUFFER: usize = 64 << 10;

/// Serves requests until the client disconnects or breaks the protocol.
pub async fn transmit<R, W>(r: R, w: W, n: Negotiated) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut r = BufReader::with_capacity(SOCKET_BUFFER, r);
    let mut w = BufWriter::with_capacity(SOCKET_BUFFER, w);
    let n = Arc::new(n);
    let form = Form {
        structured: n.structured,
        extended: n.extended,
    };
    let (tx, mut rx) = mpsc::channel::<Incoming>(MAX_REQUESTS);
    let budget = Arc::new(Semaphore::new(BUDGET_KIB as usize));
    let reader = read_requests(&mut r, tx, n.extended, budget);
    let serve = async {
        let mut inflight = FuturesUnordered::new();
        let mut closing = false;
        loop {
            tokio::select! {
                biased;
                Some((chunks, _permit)) = inflight.next(), if !inflight.is_empty() => {
                    write_chunks(&mut w, chunks).await?;
                    while let Some(Some((chunks, _permit))) = inflight.next().now_or_never() {
                        write_chunks(&mut w, chunks).await?;
                    }
                    w.flush().await?;
                }
                msg = rx.recv(), if !closing && inflight.len() < MAX_REQUESTS => match msg {
                    Some(m) if m.req.kind == CMD_DISC => {
                        drop(m);
                        closing = true;
                    }
                    Some(mut m) => {
                        let permit = m.budget.take();
                        let reply = handle(Arc::clone(&n), form, m);
                        inflight.push(async move { (reply.await, permit) });
                    }
                    None => closing = true,
                },
                else => break,
            }
        }
        w.flush().await?;
        io::Result::Ok(())
    };
    tokio::pin!(reader);
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => r,
        r = &mut reader => {
            // The reader stopped (end of stream or a broken frame): what is
            // in flight still completes and is answered.
            let served = serve.await;
            r.and(served)
        }
    }
}

/// Writes a reply into the buffer (the caller flushes).
async fn write_chunks<W: AsyncWrite + Unpin>(w: &mut W, chunks: Vec<Chunk>) -> io::Result<()> {
    for c in chunks {
        w.write_all(&c.head).await?;
        if let Some(d) = &c.data {
            w.write_all(d.as_slice()).await?;
        }
    }
    Ok(())
}

/// Reads and frames requests until DISC, the end of the stream or a frame
/// the protocol does not allow (then the connection is dropped).
async fn read_requests<R: AsyncRead + Unpin>(
    r: &mut R,
    tx: mpsc::Sender<Incoming>,
    extended: bool,
    budget: Arc<Semaphore>,
) -> io::Result<()> {
    let size = if extended {
        Request::EXT_SIZE
    } else {
        Request::SIZE
    };
    let mut head = [0u8; Request::EXT_SIZE];
    loop {
        match r.read_exact(&mut head[..size]).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        // The next request of a busy client likely follows soon: the loop polls.
        strata_block::poll::note_request();
        let Some(req) = Request::decode(&head[..size], extended) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "invalid request magic",
            ));
        };
        let has_payload =
            req.kind == CMD_WRITE || (extended && req.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        let carries = matches!(req.kind, CMD_WRITE | CMD_READ);
        let too_long = carries && req.len > MAX_BUFFER;
        if has_payload && req.len > MAX_BUFFER {
            // Its data cannot be skipped safely: the connection ends.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request length {} is larger than the maximum", req.len),
            ));
        }
        let permit = if carries && !too_long {
            // A request larger than the whole budget takes all of it: it runs alone.
            let kib = (req.len.div_ceil(1024) as u32).clamp(1, BUDGET_KIB);
            Some(
                Arc::clone(&budget)
                    .acquire_many_owned(kib)
                    .await
                    .map_err(|_| io::Error::other("budget closed"))?,
            )
        } else {
            None
        };
        let payload = if has_payload {
            let mut buf = IoBuf::zeroed(req.len as usize);
            r.read_exact(buf.as_mut_slice()).await?;
            Some(buf)
        } else {
            None
        };
        let disc = req.kind == CMD_DISC;
        let msg = Incoming {
            req,
            payload,
            too_long,
            budget: permit,
        };
        if tx.send(msg).await.is_err() || disc {
            return Ok(());
        }
    }
}
