//! Image formats: how an image's bytes map to a virtual disk.

pub(crate) mod crypto;
pub mod luks;
pub mod qcow2;
pub mod raw;
pub mod vdi;

use std::sync::Arc;
use strata_block::{Backend, Node, OpenCtx, Opts, Perm, Result};

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
