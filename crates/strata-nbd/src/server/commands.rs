//! One request from validation to its reply chunks (QEMU:
//! nbd_handle_request): read (sparse with structured replies), write,
//! flush, trim, write zeroes, cache and block status.

use super::export::MetaContext;
use super::handshake::Negotiated;
use super::reply::{Chunk, Form};
use super::transmission::Incoming;
use crate::proto::*;
use std::sync::Arc;
use strata_block::{Error, IoBuf, WriteFlags};

/// Largest block status reply, in extents (bounds its memory, as QEMU's).
const MAX_EXTENTS: usize = 1 << 17;
/// Chunk size of a CACHE request's prefetch reads.
const CACHE_CHUNK: u64 = 1 << 20;

/// Runs one request and returns its reply.
pub async fn handle(n: Arc<Negotiated>, form: Form, m: Incoming) -> Vec<Chunk> {
    let req = m.req;
    if let Err((code, msg)) = validate(&n, &m) {
        return vec![form.error(&req, code, &msg)];
    }
    let blk = &n.export.blk;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let r = match req.kind {
        CMD_READ => return read(&n, form, &req).await,
        CMD_WRITE => {
            let buf = m.payload.unwrap_or_else(|| IoBuf::zeroed(0));
            let flags = WriteFlags {
                fua,
                ..Default::default()
            };
            blk.write(req.offset, buf, flags).await.map(|_| ())
        }
        CMD_FLUSH => blk.flush().await,
        CMD_TRIM => match blk.discard(req.offset, req.len).await {
            Ok(()) if fua => blk.flush().await,
            r => r,
        },
        CMD_WRITE_ZEROES => {
            let flags = WriteFlags {
                fua,
                may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                no_fallback: req.flags & CMD_FLAG_FAST_ZERO != 0,
            };
            blk.write_zeroes(req.offset, req.len, flags).await
        }
        CMD_CACHE => cache(&n, &req).await,
        CMD_BLOCK_STATUS => return block_status(&n, form, &req).await,
        // validate() refuses every other command.
        _ => Err(Error::errno(libc::EINVAL)),
    };
    match r {
        Ok(()) => vec![form.done(&req)],
        Err(e) => vec![failed(form, &req, &e)],
    }
}

fn failed(form: Form, req: &Request, e: &Error) -> Chunk {
    form.error(req, errno_to_wire(e.code()), &e.to_string())
}

/// Checks a request before anything runs (QEMU: nbd_co_receive_request).
fn validate(n: &Negotiated, m: &Incoming) -> Result<(), (u32, String)> {
    let req = &m.req;
    let mut valid = CMD_FLAG_FUA;
    match req.kind {
        CMD_READ if n.structured => valid |= CMD_FLAG_DF,
        CMD_WRITE_ZEROES => valid |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => valid |= CMD_FLAG_REQ_ONE,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => {}
        k => return Err((EINVAL, format!("unsupported command {k}"))),
    }
    if n.extended && req.kind == CMD_WRITE {
        valid |= CMD_FLAG_PAYLOAD_LEN;
    }
    if req.flags & !valid != 0 {
        return Err((EINVAL, format!("unsupported flags 0x{:x}", req.flags)));
    }
    if m.too_long {
        let msg = format!("len ({}) is larger than max len ({MAX_BUFFER})", req.len);
        return Err((EINVAL, msg));
    }
    if matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) && !n.export.writable {
        return Err((EPERM, "export is read-only".into()));
    }
    if req.kind != CMD_FLUSH {
        let size = n.export.size();
        if req.offset > size || req.len > size - req.offset {
            let msg = format!(
                "operation past EOF; From: {}, Len: {}, Size: {size}",
                req.offset, req.len
            );
            return Err((EINVAL, msg));
        }
    }
    if req.kind == CMD_BLOCK_STATUS && n.contexts.is_empty() {
        return Err((EINVAL, "CMD_BLOCK_STATUS not negotiated".into()));
    }
    Ok(())
}

/// A read: one data reply, or with structured replies (and no DF) holes
/// for what reads as zeroes and data chunks for the rest (QEMU:
/// nbd_co_send_sparse_read).
async fn read(n: &Negotiated, form: Form, req: &Request) -> Vec<Chunk> {
    let blk = &n.export.blk;
    if !form.structured || req.flags & CMD_FLAG_DF != 0 || req.len == 0 {
        return match blk.read(req.offset, IoBuf::zeroed(req.len as usize)).await {
            Ok(buf) if form.structured => {
                let p = req.offset.to_be_bytes();
                let kind = REPLY_TYPE_OFFSET_DATA;
                vec![form.chunk(REPLY_FLAG_DONE, kind, req, &p, Some(buf))]
            }
            Ok(buf) => vec![form.simple(0, req.cookie, Some(buf))],
            Err(e) => vec![failed(form, req, &e)],
        };
    }
    let runs = match sparse_runs(n, req.offset, req.offset + req.len).await {
        Ok(r) => r,
        Err(e) => return vec![failed(form, req, &e)],
    };
    let mut chunks = Vec::with_capacity(runs.len());
    let mut off = req.offset;
    for (i, &(len, zero)) in runs.iter().enumerate() {
        let flags = if i + 1 == runs.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        if zero {
            let mut p = off.to_be_bytes().to_vec();
            p.extend_from_slice(&(len as u32).to_be_bytes());
            chunks.push(form.chunk(flags, REPLY_TYPE_OFFSET_HOLE, req, &p, None));
        } else {
            match blk.read(off, IoBuf::zeroed(len as usize)).await {
                Ok(buf) => {
                    let p = off.to_be_bytes();
                    let kind = REPLY_TYPE_OFFSET_DATA;
                    chunks.push(form.chunk(flags, kind, req, &p, Some(buf)));
                }
                Err(e) => {
                    // Data chunks already built are dropped: the error alone
                    // answers the request.
                    return vec![failed(form, req, &e)];
                }
            }
        }
        off += len;
    }
    chunks
}

/// `[offset, end)` as runs of data and of zeroes, `(length, zero)`, each
/// as long as block status allows: a read over clusters scattered in the
/// file is still one data chunk, one buffer and one reply write (QEMU
/// sends a chunk per extent).
async fn sparse_runs(
    n: &Negotiated,
    offset: u64,
    end: u64,
) -> strata_block::Result<Vec<(u64, bool)>> {
    let mut runs: Vec<(u64, bool)> = Vec::new();
    let mut off = offset;
    while off < end {
        let (st, _) = n.export.blk.block_status_above(off, end - off).await?;
        let len = st.len.clamp(1, end - off);
        match runs.last_mut() {
            Some((l, zero)) if *zero == st.zero => *l += len,
            _ => runs.push((len, st.zero)),
        }
        off += len;
    }
    Ok(runs)
}

/// Prefetch: the range is read (and so copied up where copy-on-read is on).
async fn cache(n: &Negotiated, req: &Request) -> strata_block::Result<()> {
    let end = req.offset + req.len;
    let mut off = req.offset;
    while off < end {
        let len = CACHE_CHUNK.min(end - off);
        n.export.blk.read(off, IoBuf::zeroed(len as usize)).await?;
        off += len;
    }
    Ok(())
}

/// One extent list per selected context; the last chunk ends the reply.
async fn block_status(n: &Negotiated, form: Form, req: &Request) -> Vec<Chunk> {
    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let mut chunks = Vec::new();
    for (i, (id, ctx)) in n.contexts.iter().enumerate() {
        let extents = match extents(n, ctx, req.offset, req.len, one).await {
            Ok(e) => e,
            Err(e) => return vec![failed(form, req, &e)],
        };
        let last = i + 1 == n.contexts.len();
        let flags = if last { REPLY_FLAG_DONE } else { 0 };
        let mut p = id.to_be_bytes().to_vec();
        let kind = if form.extended {
            p.extend_from_slice(&(extents.len() as u32).to_be_bytes());
            for (len, f) in &extents {
                p.extend_from_slice(&len.to_be_bytes());
                p.extend_from_slice(&(*f as u64).to_be_bytes());
            }
            REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            for (len, f) in &extents {
                p.extend_from_slice(&(*len as u32).to_be_bytes());
                p.extend_from_slice(&f.to_be_bytes());
            }
            REPLY_TYPE_BLOCK_STATUS
        };
        chunks.push(form.chunk(flags, kind, req, &p, None));
    }
    chunks
}

/// The extents of one context over `[offset, offset + len)`: runs of equal
/// flags, merged, at most `MAX_EXTENTS` (one with `one`).
async fn extents(
    n: &Negotiated,
    ctx: &MetaContext,
    offset: u64,
    len: u64,
    one: bool,
) -> strata_block::Result<Vec<(u64, u32)>> {
    let blk = &n.export.blk;
    let end = offset + len;
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut off = offset;
    // Compact replies carry 32-bit lengths.
    let max_len = u32::MAX as u64 / 512 * 512;
    while off < end {
        let (run, flags) = match ctx {
            MetaContext::BaseAllocation => {
                let (st, _) = blk.block_status_above(off, end - off).await?;
                let f = if st.data { 0 } else { STATE_HOLE } | if st.zero { STATE_ZERO } else { 0 };
                (st.len, f)
            }
            MetaContext::AllocationDepth => {
                let (st, depth) = blk.block_status_above(off, end - off).await?;
                let d = if st.allocated { depth as u32 + 1 } else { 0 };
                (st.len, d)
            }
            MetaContext::DirtyBitmap(b) => {
                if b.get(off) {
                    let clean = b.next_clean(off, end).unwrap_or(end);
                    (clean - off, STATE_DIRTY)
                } else {
                    let dirty = b
                        .next_dirty_area(off, end, u64::MAX)
                        .map_or(end, |(s, _)| s);
                    (dirty - off, 0)
                }
            }
        };
        let run = run.clamp(1, end - off).min(max_len);
        match out.last_mut() {
            Some((l, f)) if *f == flags && *l + run <= max_len => *l += run,
            _ => {
                if one && !out.is_empty() {
                    break;
                }
                if out.len() == MAX_EXTENTS {
                    break;
                }
                out.push((run, flags));
            }
        }
        off += run;
    }
    Ok(out)
}
