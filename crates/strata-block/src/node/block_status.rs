//! Block status (QEMU: bdrv_co_block_status): what is at an offset of a
//! node, with pass-through to the layer that answers for it, and through
//! a backing chain.

use super::Node;
use crate::error::Result;
use crate::status::BlockStatus;
use std::sync::Arc;

impl Node {
    /// What is at `offset` in this node: at most `len` bytes of one kind.
    /// Pass-through layers (raw, filters) answer with their child's status.
    pub async fn block_status(self: &Arc<Self>, offset: u64, len: u64) -> Result<BlockStatus> {
        let size = self.length();
        if offset >= size {
            return Ok(BlockStatus::zero(0));
        }
        let len = len.min(size - offset);
        // Counted for drain; it waits for nobody.
        let req = self.tracker.begin(0, 0, false).await;
        let mut st = self.driver.block_status(offset, len).await?;
        drop(req);
        st.len = st.len.clamp(1, len);
        st.allocated = st.data || st.zero;
        if !st.allocated && self.driver.supports_backing() {
            // Unallocated reads as zeroes without a backing file or beyond its end.
            match self.backing() {
                None => st.zero = true,
                Some(b) if offset >= b.length() => st.zero = true,
                Some(_) => {}
            }
        }
        if st.here {
            st.host = Some((Arc::clone(self), offset));
        }
        if st.raw {
            if let Some((child, host)) = st.host.clone() {
                // The child's answer, offset and all (none if it has none).
                let mut inner = Box::pin(child.block_status(host, st.len)).await?;
                inner.len = inner.len.min(st.len);
                return Ok(inner);
            }
        }
        if st.recurse {
            if let Some((child, host)) = st.host.clone() {
                let inner = Box::pin(child.block_status(host, st.len)).await?;
                st.len = st.len.min(inner.len.max(1));
                st.zero = inner.zero;
                st.data = !inner.zero || st.data;
            }
        } else if st.data && !st.zero {
            // Data beyond the end of the host file reads as zeroes.
            if let Some((child, host)) = &st.host {
                if *host >= child.length() {
                    st.zero = true;
                }
            }
        }
        Ok(st)
    }

    /// Block status through the backing chain and its filters down to (not
    /// including) `base`:
    /// the status of the first layer that has the range allocated, and its
    /// depth; where no layer has, the bottom layer's status.
    pub async fn block_status_above(
        self: &Arc<Self>,
        base: Option<&Arc<Node>>,
        offset: u64,
        len: u64,
    ) -> Result<(BlockStatus, usize)> {
        let mut node = Arc::clone(self);
        let mut depth = 0;
        let mut len = len;
        loop {
            let st = node.block_status(offset, len).await?;
            if st.allocated {
                return Ok((st, depth));
            }
            len = st.len;
            // A filter in the chain (a backup's copy-before-write over a
            // backing file) is a layer to pass through, as in QEMU.
            match node.filter_or_cow() {
                Some(b)
                    if base.is_none_or(|base| !Arc::ptr_eq(base, &b)) && offset < b.length() =>
                {
                    node = b;
                    depth += 1;
                }
                _ => return Ok((st, depth)),
            }
        }
    }
}
