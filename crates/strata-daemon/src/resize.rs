//! `block_resize` (QEMU: qmp_block_resize): find the node, refuse a
//! negative size, a node an operation blocks (a backing file in use), a
//! node whose users do not let it change size, and a read-only image;
//! then change its length as bdrv_co_truncate does.

use crate::blockdev::Daemon;
use strata_block::{Backend, BlockOp, Perm, Preallocation};

/// Largest length a node may have (QEMU: BDRV_MAX_LENGTH).
const MAX_LENGTH: i64 = i64::MAX / (1 << 30) * (1 << 30);

impl Daemon {
    /// Resizes the node `node_name` (or the device `device`: the daemon has
    /// no devices) to `size` bytes.
    pub async fn block_resize(
        &self,
        device: Option<&str>,
        node_name: Option<&str>,
        size: i64,
    ) -> Result<(), String> {
        let node = node_name.and_then(|n| self.graph.find(n)).ok_or_else(|| {
            format!(
                "Cannot find device='{}' nor node-name='{}'",
                device.unwrap_or_default(),
                node_name.unwrap_or_default()
            )
        })?;
        if size < 0 {
            return Err("Parameter 'size' expects a >0 size".into());
        }
        node.check_op(BlockOp::Resize).map_err(|e| e.to_string())?;
        // As QEMU, through a user handle that takes resize and shares all.
        let blk = Backend::new(&node, "an unnamed block device", Perm::RESIZE, Perm::ALL)
            .map_err(|e| e.to_string())?;
        let r = resize_through(&blk, size).await;
        let _ = blk.close().await;
        r
    }
}

/// The rest of block_resize's checks, then the resize, through `blk`.
async fn resize_through(blk: &Backend, size: i64) -> Result<(), String> {
    let node = blk.node();
    if size > MAX_LENGTH {
        return Err(format!("offset({size}) exceeds maximum({MAX_LENGTH})"));
    }
    if node.is_read_only() {
        return Err("Image is read-only".into());
    }
    // Not exact, as QEMU's block_resize.
    blk.truncate(size as u64, false, Preallocation::Off)
        .await
        .map_err(|e| match e.message() {
            Some(m) => m.to_string(),
            None if e.code() == libc::ENOTSUP => {
                "Image format driver does not support resize".to_string()
            }
            None => e.to_string(),
        })
}
