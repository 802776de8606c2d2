//! "Creating" an image on a protocol that cannot make new ones (nbd, and
//! later iscsi, rbd without a pool's rights): the target must already
//! exist; it is opened, made at least the asked size if it can be, and its
//! first sector zeroed so that no stale header is probed (QEMU:
//! bdrv_co_create_opts_simple).

use crate::driver::{Preallocation, WriteFlags};
use crate::error::{Error, Result};
use crate::open::OpenCtx;
use crate::options::{take_size, take_str, Opts};

/// Creates on an existing target of the protocol driver `driver`.
pub async fn create_on_existing(
    ctx: &OpenCtx,
    driver: &str,
    filename: &str,
    mut opts: Opts,
) -> Result<()> {
    let size = take_size(&mut opts, "size")?.unwrap_or(0);
    if let Some(p) = take_str(&mut opts, "preallocation")? {
        if p != "off" {
            return Err(Error::unsupported(format!(
                "Unsupported preallocation mode '{p}'"
            )));
        }
    }
    let mut flags = ctx.flags.clone();
    flags.read_only = false;
    let octx = OpenCtx::new(std::sync::Arc::clone(&ctx.registry), flags);
    let node = octx.open_file(filename).await.map_err(|e| {
        e.context(format!(
            "Protocol driver '{driver}' does not support creating new images, so an existing image must be selected as the target; however, opening the given target as an existing image failed"
        ))
    })?;
    let made = async {
        // At least `size` bytes: a target that cannot grow says so; one
        // that is longer stays as it is.
        let grown = node.truncate(size, false, Preallocation::Off).await;
        if node.length() < size {
            return Err(grown.err().unwrap_or_else(|| {
                Error::unsupported("Could not resize the target to the image size")
            }));
        }
        let first = size.min(512);
        if first > 0 {
            let flags = WriteFlags {
                may_unmap: true,
                ..WriteFlags::default()
            };
            node.write_zeroes(0, first, flags)
                .await
                .map_err(|e| e.context("Failed to clear the new image's first sector"))?;
        }
        node.flush().await
    }
    .await;
    let closed = node.close().await;
    made.and(closed)
}
