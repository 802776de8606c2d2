//! What a server serves under one name: a user handle on a node, with the
//! transmission flags and the meta contexts it offers (QEMU: NBDExport).

use crate::proto::*;
use std::sync::Arc;
use strata_block::bitmap::Check;
use strata_block::bitmap::DirtyBitmap;
use strata_block::driver::Perm;
use strata_block::{Backend, Node};

/// The permissions an export's user handle takes and shares: reading,
/// writing when writable; nobody may resize the disk under its clients
/// (QEMU: nbd_export_create).
pub fn export_perms(writable: bool) -> (Perm, Perm) {
    let perm = if writable {
        Perm::CONSISTENT_READ.with(Perm::WRITE)
    } else {
        Perm::CONSISTENT_READ
    };
    (perm, Perm::ALL.without(Perm::RESIZE))
}

/// How an export names a dirty bitmap to offer (QAPI:
/// BlockDirtyBitmapOrStr): by name on the exported node or below it, or on
/// a node named too.
pub enum BitmapRef<'a> {
    Local(&'a str),
    External { node: &'a str, name: &'a str },
}

/// Finds the bitmaps an export offers and marks them busy for its life,
/// with QEMU's checks and words (nbd_export_create): a bitmap still
/// recording writes cannot back a read-only export of a writable node, as
/// it would change under the client. `external` looks up `{node, name}`.
pub fn export_bitmaps(
    node: &Arc<Node>,
    refs: &[BitmapRef<'_>],
    readonly: bool,
    external: impl Fn(&str, &str) -> Result<Arc<DirtyBitmap>, String>,
) -> Result<Vec<(String, Arc<DirtyBitmap>)>, String> {
    let mut found = Vec::new();
    for r in refs {
        let (name, bm) = match *r {
            BitmapRef::Local(name) => {
                let mut at = Some(Arc::clone(node));
                let mut hit = None;
                while let Some(n) = at {
                    if let Some(b) = n.bitmaps().find(name) {
                        hit = Some((n, b));
                        break;
                    }
                    at = n.filter_or_cow();
                }
                let Some((owner, bm)) = hit else {
                    return Err(format!("Bitmap '{name}' is not found"));
                };
                if readonly && !owner.is_read_only() && bm.is_enabled() {
                    return Err(format!(
                        "Enabled bitmap '{name}' incompatible with readonly export"
                    ));
                }
                (name, bm)
            }
            BitmapRef::External { node, name } => (name, external(node, name)?),
        };
        bm.check(Check::AllowReadOnly).map_err(|e| e.to_string())?;
        found.push((name.to_string(), bm));
    }
    for (_, b) in &found {
        b.set_busy(true);
    }
    Ok(found)
}

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
    /// Connections in transmission, and the signal that ends them.
    pub state: ExportState,
}

impl Drop for Export {
    /// The bitmaps it offered are free for other users again.
    fn drop(&mut self) {
        for (_, b) in &self.bitmaps {
            b.set_busy(false);
        }
    }
}

/// The connections of an export, counted, and ended when it is removed
/// (QEMU's hard removal; a safe one first checks that there are none).
pub struct ExportState {
    clients: std::sync::atomic::AtomicUsize,
    closed: tokio::sync::watch::Sender<bool>,
}

impl Default for ExportState {
    fn default() -> Self {
        ExportState {
            clients: std::sync::atomic::AtomicUsize::new(0),
            closed: tokio::sync::watch::channel(false).0,
        }
    }
}

impl ExportState {
    /// Connections serving this export now.
    pub fn clients(&self) -> usize {
        self.clients.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Ends every connection and waits until they are gone.
    pub async fn close(&self) {
        self.closed.send_replace(true);
        let mut rx = self.closed.subscribe();
        while self.clients() > 0 {
            // Each connection that ends says so on the channel.
            if rx.changed().await.is_err() {
                break;
            }
        }
    }

    /// Runs `serve` as one connection of the export, unless or until the
    /// export is closed.
    pub async fn serve<F: std::future::Future<Output = std::io::Result<()>>>(
        &self,
        serve: F,
    ) -> std::io::Result<()> {
        let mut closed = self.closed.subscribe();
        if *closed.borrow_and_update() {
            return Ok(());
        }
        self.clients
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let r = tokio::select! {
            r = serve => r,
            _ = closed.wait_for(|c| *c) => Ok(()),
        };
        self.clients
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        // Wakes a close() waiting for the last connection.
        self.closed.send_modify(|_| {});
        r
    }
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
