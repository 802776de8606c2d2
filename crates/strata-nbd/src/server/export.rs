//! What a server serves under one name: a user handle on a node, with the
//! transmission flags and the meta contexts it offers (QEMU: NBDExport).

use crate::proto::*;
use std::sync::Arc;
use strata_block::bitmap::DirtyBitmap;
use strata_block::Backend;

/// One export.
pub struct Export {
    pub name: String,
    pub description: Option<String>,
    pub blk: Arc<Backend>,
    pub writable: bool,
    /// Clients may open several connections and see each other's writes
    /// after a flush on any one (CAN_MULTI_CONN).
    pub multi_conn: bool,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:<export name>`.
    pub bitmaps: Vec<(String, Arc<DirtyBitmap>)>,
    /// `qemu:allocation-depth` is offered.
    pub allocation_depth: bool,
}

/// A meta context a client selected, with the id the server gave it.
#[derive(Clone)]
pub enum MetaContext {
    BaseAllocation,
    AllocationDepth,
    DirtyBitmap(Arc<DirtyBitmap>),
}

impl Export {
    /// The transmission flags of this export (QEMU: nbd_export_create),
    /// before what the negotiation adds.
    pub fn flags(&self) -> u16 {
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
        if self.writable {
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        } else {
            f |= FLAG_READ_ONLY;
        }
        if self.multi_conn {
            f |= FLAG_CAN_MULTI_CONN;
        }
        f
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.blk.length()
    }

    /// Every context this export has, with its name and its id: ids are
    /// fixed per export (0: base:allocation, 1: allocation depth, 2 on:
    /// bitmaps), so a client's ids mean the same on every connection.
    pub fn contexts(&self) -> Vec<(u32, String, MetaContext)> {
        let mut v = vec![(
            0,
            "base:allocation".to_string(),
            MetaContext::BaseAllocation,
        )];
        if self.allocation_depth {
            v.push((
                1,
                "qemu:allocation-depth".to_string(),
                MetaContext::AllocationDepth,
            ));
        }
        for (i, (name, b)) in self.bitmaps.iter().enumerate() {
            v.push((
                2 + i as u32,
                format!("qemu:dirty-bitmap:{name}"),
                MetaContext::DirtyBitmap(Arc::clone(b)),
            ));
        }
        v
    }

    /// The contexts a query selects: an exact name, or for LIST a
    /// namespace (`base:`, `qemu:`, `qemu:dirty-bitmap:`) or an empty
    /// query for all (the protocol document's and QEMU's rules).
    pub fn matching(&self, query: &str, list: bool) -> Vec<(u32, String, MetaContext)> {
        self.contexts()
            .into_iter()
            .filter(|(_, name, _)| {
                if name == query {
                    return true;
                }
                if !list {
                    return false;
                }
                match query {
                    "base:" | "qemu:" | "qemu:dirty-bitmap:" => name.starts_with(query),
                    _ => false,
                }
            })
            .collect()
    }
}
