//! Image formats: how an image's bytes map to a virtual disk.

pub(crate) mod crypto;
pub mod luks;
pub mod qcow;
pub mod qcow2;
pub mod raw;
pub mod vdi;
pub mod vpc;

use std::sync::Arc;
use strata_block::{Backend, Error, IoBuf, Node, OpenCtx, Opts, Perm, Result};

/// A creating user of `node`: it writes and resizes, sharing everything
/// (QEMU's blk_co_new_with_bs in the formats' create).
pub(crate) fn creating_user(node: &Arc<Node>) -> Result<Backend> {
    Backend::new(
        node,
        "an unnamed block device",
        Perm::WRITE.with(Perm::RESIZE),
        Perm::ALL,
    )
}

/// Makes the file `filename` with the protocol's options and opens it
/// writable, for a format to be written into (QEMU's create_opts:
/// bdrv_co_create_file, then bdrv_co_open of the new file).
pub(crate) async fn create_and_open_file(
    ctx: &OpenCtx,
    filename: &str,
    file_opts: Opts,
) -> Result<Arc<Node>> {
    ctx.create_file(filename, file_opts).await?;
    let mut flags = ctx.flags.clone();
    flags.read_only = false;
    let octx = OpenCtx::new(Arc::clone(&ctx.registry), flags);
    octx.open_file(filename).await
}

/// Ends a create on `file`: flushed if formatting it went well, closed
/// either way.
pub(crate) async fn finish_created(file: Arc<Node>, formatted: Result<()>) -> Result<()> {
    let r = match formatted {
        Ok(()) => file.flush().await,
        Err(e) => Err(e),
    };
    let c = file.close().await;
    r.and(c)
}

/// A random version 4 UUID, bytes in RFC 4122 order (QEMU:
/// qemu_uuid_generate).
pub(crate) fn uuid_v4() -> Result<[u8; 16]> {
    let mut u = [0u8; 16];
    getrandom::fill(&mut u)
        .map_err(|e| Error::msg(libc::EIO, format!("Unable to read random bytes: {e}")))?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

/// `buf` filled with zeroes.
pub(crate) fn zero_fill(mut buf: IoBuf) -> IoBuf {
    buf.as_mut_slice().fill(0);
    buf
}

/// What an unallocated range of a format reads: its backing file at the
/// same offset, zeroes where there is none or it is shorter.
pub(crate) async fn read_backing(
    backing: Option<Arc<Node>>,
    offset: u64,
    buf: IoBuf,
) -> Result<IoBuf> {
    let Some(b) = backing else {
        return Ok(zero_fill(buf));
    };
    let blen = b.length();
    if offset >= blen {
        return Ok(zero_fill(buf));
    }
    let n = (buf.len() as u64).min(blen - offset) as usize;
    if n == buf.len() {
        return b.read(offset, buf).await;
    }
    let (head, tail) = buf.split_at(n);
    let head = b.read(offset, head).await?;
    Ok(IoBuf::join_all(vec![head, zero_fill(tail)]))
}
