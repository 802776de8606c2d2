//! Nodes of the block graph (QEMU: BlockDriverState, block.c): a driver
//! instance with its name, options, references, op blockers and activation
//! state. The request path is in `io`, block status in `block_status`,
//! the edges to parents and children in `edges`, drained sections in
//! `drain`, the options every node takes in `common_opts`.

use crate::blockers::{BlockOp, Blocker, OpBlockers};
use crate::driver::{Child, ChildRole, Driver, Limits, Perm};
use crate::error::{err, Error, Result};
use crate::event_loop::LoopHandle;
use crate::graph::ParentLink;
use crate::tracked::Tracker;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

mod bitmaps;
mod block_status;
mod common_opts;
mod drain;
mod edges;
mod freeze;
mod funnel;
mod io;
mod limits_cell;
mod reopen;
mod replace;

pub use common_opts::{check_detect_zeroes, parse_discard, CacheMode, DetectZeroes, NodeOptions};
pub use drain::{
    drain_begin, drain_begin_adopting, drained, drained_async, drained_async_adopting, DrainGuard,
};
pub use freeze::FrozenChain;
pub use funnel::{BeforeWrite, ThresholdExceeded, ThresholdHook, WriteKind, WriteReq};
pub use replace::{drop_intermediate, replace_child_edge, replace_node};

static NEXT_AUTO_NAME: AtomicU64 = AtomicU64::new(0);

/// A node of the block graph: a driver instance with its request path.
pub struct Node {
    name: String,
    naming: crate::filename::Naming,
    /// What the node is called now: worked out again whenever its
    /// children change (see [`Node::refresh_identity`]).
    identity: Mutex<Arc<crate::filename::Identity>>,
    driver: Box<dyn Driver>,
    /// Changes only in a reopen (QEMU: bdrv_reopen_set_read_only).
    read_only: AtomicBool,
    writeback: AtomicBool,
    /// These four change only in a reopen, drained (see `crate::reopen`).
    no_flush: AtomicBool,
    direct: AtomicBool,
    unmap: AtomicBool,
    detect_zeroes: std::sync::atomic::AtomicU8,
    copy_on_read: bool,
    /// Recomputed whenever the children change (QEMU: bdrv_refresh_limits).
    limits: limits_cell::LimitsCell,
    tracker: Tracker,
    closed: AtomicBool,
    /// Users holding the node open: its opener, parents that found it by
    /// name, the monitor (QEMU: refcnt). The node closes when this reaches 0.
    refs: AtomicUsize,
    /// The edges from the parents that use this node.
    parents: Mutex<Vec<ParentLink>>,
    /// The user handles on this node (QEMU: the BlockBackends whose root it is).
    backends: Mutex<Vec<std::sync::Weak<crate::backend::BackendLink>>>,
    /// The write funnel: notifiers before each write, bitmaps after it.
    before_write: std::sync::RwLock<Vec<Arc<dyn funnel::BeforeWrite>>>,
    has_before_write: AtomicBool,
    bitmaps: Arc<crate::bitmap::DirtyBitmaps>,
    write_threshold: AtomicU64,
    /// The end of the furthest write so far (QEMU: wr_highest_offset).
    wr_highest_offset: AtomicU64,
    /// Writes completed so far (QEMU: write_gen).
    write_gen: AtomicU64,
    /// One flush at a time, in the order they were asked for (QEMU:
    /// active_flush_req and flush_queue): a flush completes after every
    /// flush asked before it. Holds the write generation the last
    /// successful flush made stable (QEMU: flushed_gen).
    flush_order: tokio::sync::Mutex<u64>,
    threshold_hook: Mutex<Option<funnel::ThresholdHook>>,
    blockers: OpBlockers,
    /// What this node blocks on its backing child while it uses it.
    backing_blocker: Arc<Blocker>,
    /// The loop the node and its users run on; None: the main loop.
    home: Mutex<Option<LoopHandle>>,
    /// Drained sections holding new requests back (QEMU: quiesce_counter).
    gate: AtomicUsize,
    /// Drained sections holding this node's user handles back (for a node
    /// that also has parents, whose requests must go on).
    user_gate: AtomicUsize,
    gate_open: Notify,
    /// False while another process owns the image (QEMU: BDRV_O_INACTIVE).
    active: AtomicBool,
    /// What the node's parents asked for on it, taken again on activation.
    perm: Mutex<Option<(Perm, Perm)>>,
    /// Jobs holding its backing or filter link in place (see `freeze`).
    frozen: AtomicUsize,
}

impl Node {
    /// Wraps an open driver in a node. `name` empty gives an automatic one.
    pub fn new(
        name: &str,
        naming: crate::filename::Naming,
        driver: Box<dyn Driver>,
        opts: NodeOptions,
    ) -> Arc<Node> {
        let name = if name.is_empty() {
            format!(
                "#block{:03}",
                NEXT_AUTO_NAME.fetch_add(1, Ordering::Relaxed)
            )
        } else {
            name.to_string()
        };
        let limits = limits_of(&*driver);
        let backing_blocker = Blocker::new(format!("node is used as backing hd of '{name}'"));
        let node = Arc::new(Node {
            name,
            identity: Mutex::new(Arc::new(naming.identity(&*driver))),
            naming,
            driver,
            read_only: AtomicBool::new(opts.read_only),
            writeback: AtomicBool::new(opts.cache.writeback),
            no_flush: AtomicBool::new(opts.cache.no_flush),
            direct: AtomicBool::new(opts.cache.direct),
            unmap: AtomicBool::new(opts.unmap),
            detect_zeroes: std::sync::atomic::AtomicU8::new(opts.detect_zeroes as u8),
            copy_on_read: opts.copy_on_read,
            limits: limits_cell::LimitsCell::new(limits),
            tracker: Tracker::default(),
            closed: AtomicBool::new(false),
            refs: AtomicUsize::new(1),
            parents: Mutex::new(Vec::new()),
            backends: Mutex::new(Vec::new()),
            before_write: std::sync::RwLock::new(Vec::new()),
            has_before_write: AtomicBool::new(false),
            bitmaps: Default::default(),
            write_threshold: AtomicU64::new(0),
            wr_highest_offset: AtomicU64::new(0),
            write_gen: AtomicU64::new(0),
            flush_order: tokio::sync::Mutex::new(0),
            threshold_hook: Mutex::new(None),
            blockers: OpBlockers::default(),
            backing_blocker,
            home: Mutex::new(None),
            gate: AtomicUsize::new(0),
            user_gate: AtomicUsize::new(0),
            gate_open: Notify::new(),
            active: AtomicBool::new(!opts.inactive),
            perm: Mutex::new(None),
            frozen: AtomicUsize::new(0),
        });
        node.attach_children();
        node
    }

    /// The node's op blockers.
    pub fn blockers(&self) -> &OpBlockers {
        &self.blockers
    }

    /// Fails with the first reason blocking `op` on this node (QEMU:
    /// bdrv_op_is_blocked).
    pub fn check_op(&self, op: BlockOp) -> Result<()> {
        self.blockers.check(op, &self.name)
    }

    /// Takes one more reference: the caller now shares the node and must
    /// [`close`](Self::close) it when done.
    pub fn add_ref(&self) {
        self.refs.fetch_add(1, Ordering::AcqRel);
    }

    /// How many users hold the node open.
    pub fn ref_count(&self) -> usize {
        self.refs.load(Ordering::Acquire)
    }

    /// The loop this node's requests should run on; None: the main loop.
    pub fn home(&self) -> Option<LoopHandle> {
        self.home.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True once the last user has closed the node.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The node name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The node's name as QEMU shows it: the file name it was opened with,
    /// or `json:{...}` when its options say more than a file name can.
    pub fn filename(&self) -> String {
        self.identity().filename()
    }
    /// What the node's parents need to name themselves.
    pub fn identity(&self) -> Arc<crate::filename::Identity> {
        Arc::clone(&self.identity.lock().unwrap_or_else(|p| p.into_inner()))
    }
    /// How the node works its name out.
    pub fn naming(&self) -> &crate::filename::Naming {
        &self.naming
    }
    /// Works the node's name out again after its children changed, and
    /// then its parents' (QEMU: bdrv_refresh_filename, which runs at every
    /// query).
    pub fn refresh_identity(&self) {
        let new = self.naming.identity(&*self.driver);
        {
            let mut cur = self.identity.lock().unwrap_or_else(|p| p.into_inner());
            if **cur == new {
                return;
            }
            *cur = Arc::new(new);
        }
        for link in self.parents() {
            if let Some(p) = link.parent.upgrade() {
                p.refresh_identity();
            }
        }
    }
    /// The driver instance.
    pub fn driver(&self) -> &dyn Driver {
        &*self.driver
    }
    /// The driver's name.
    pub fn format_name(&self) -> &'static str {
        self.driver.format_name()
    }
    /// True when writes are refused.
    /// `cache.direct` and `cache.no-flush`, as the node was opened or
    /// last reopened.
    pub fn cache_mode(&self) -> (bool, bool) {
        (self.direct.load(Ordering::Relaxed), self.no_flush())
    }

    fn no_flush(&self) -> bool {
        self.no_flush.load(Ordering::Relaxed)
    }

    /// Discards are passed on (`discard=unmap`).
    pub fn unmap(&self) -> bool {
        self.unmap.load(Ordering::Relaxed)
    }

    /// What the node does with writes of zeroes.
    pub fn detect_zeroes(&self) -> DetectZeroes {
        DetectZeroes::from_u8(self.detect_zeroes.load(Ordering::Relaxed))
    }

    /// Sets the options every node takes that a reopen may change
    /// (`discard`, `detect-zeroes`, `cache.no-flush`); the caller has
    /// drained the node.
    pub(crate) fn set_common_options(&self, unmap: bool, dz: DetectZeroes, no_flush: bool) {
        self.unmap.store(unmap, Ordering::Relaxed);
        self.detect_zeroes.store(dz as u8, Ordering::Relaxed);
        self.no_flush.store(no_flush, Ordering::Relaxed);
    }

    /// Zero writes with unmap deallocate here (QEMU:
    /// bdrv_can_write_zeroes_with_unmap): `discard=unmap` and a driver that can.
    pub fn can_write_zeroes_with_unmap(&self) -> bool {
        self.unmap() && self.driver.zeroes_may_unmap()
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }
    /// The limits requests to this node obey.
    pub fn limits(&self) -> Limits {
        self.limits.get()
    }

    /// Asks the driver for its limits again, then the parents, whose limits
    /// may follow from this node's (QEMU: bdrv_refresh_limits).
    pub fn refresh_limits(&self) {
        self.limits.set(limits_of(&*self.driver));
        for p in self.parents() {
            if let Some(p) = p.parent.upgrade() {
                p.refresh_limits();
            }
        }
    }
    /// Length in bytes, rounded up to whole 512-byte sectors as QEMU counts
    /// them (a 1234-byte raw image is 1536 bytes long; the tail reads as zeroes).
    pub fn length(&self) -> u64 {
        self.driver.length().div_ceil(512) * 512
    }
    /// The children of this node.
    pub fn children(&self) -> Vec<Child> {
        self.driver.children()
    }
    /// The child in `role`, if any.
    pub fn child(&self, role: ChildRole) -> Option<Arc<Node>> {
        self.children()
            .into_iter()
            .find(|c| c.role == role)
            .map(|c| c.node)
    }
    /// The child that carries this node's data and metadata (QEMU:
    /// bdrv_primary_bs): `file` of a format, the filtered child of a filter
    /// (the backing child of a filter that has no other, as commit's).
    pub fn primary_child(&self) -> Option<Arc<Node>> {
        let children = self.children();
        let primary = children.iter().find(|c| c.role.is_primary());
        let filtered = || {
            children
                .iter()
                .find(|c| self.driver.is_filter() && c.role == ChildRole::Backing)
        };
        primary.or_else(filtered).map(|c| Arc::clone(&c.node))
    }
    /// The first node at or below this one, down the primary children, of
    /// which `pred` holds.
    pub fn find_down(self: &Arc<Self>, pred: impl Fn(&Node) -> bool) -> Option<Arc<Node>> {
        let mut node = Arc::clone(self);
        while !pred(&node) {
            node = node.primary_child()?;
        }
        Some(node)
    }
    /// The first node at or below this one that is not a filter (QEMU:
    /// bdrv_skip_filters): what tools look at to describe an image.
    pub fn skip_filters(self: &Arc<Self>) -> Arc<Node> {
        let mut node = Arc::clone(self);
        while node.driver.is_filter() {
            match node.primary_child() {
                Some(c) => node = c,
                None => break,
            }
        }
        node
    }
    /// The backing node, if any.
    pub fn backing(&self) -> Option<Arc<Node>> {
        self.child(ChildRole::Backing)
    }
    /// Takes `perm` and shares `shared` on the storage under this node
    /// (protocols lock the image; filters pass it on).
    pub fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        *self.perm.lock().unwrap_or_else(|p| p.into_inner()) = Some((perm, shared));
        if !self.is_active() {
            // Taken when the node is activated.
            return Ok(());
        }
        self.driver.set_perm(perm, shared)
    }

    /// False while the node is inactive: another process owns the image.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Hands the image over to another process (QEMU: bdrv_inactivate):
    /// caches are written back, locks released, and writes refused until
    /// [`activate`](Self::activate). Children follow once no active parent
    /// is left on them.
    pub async fn inactivate(self: &Arc<Self>) -> Result<()> {
        if self.has_active_parent() {
            return Err(Error::invalid("Node has active parent node"));
        }
        Box::pin(self.inactivate_recurse()).await
    }

    fn has_active_parent(&self) -> bool {
        self.parents()
            .iter()
            .filter_map(|p| p.parent.upgrade())
            .any(|p| p.is_active())
    }

    async fn inactivate_recurse(self: &Arc<Self>) -> Result<()> {
        if self.has_active_parent() || !self.is_active() {
            return Ok(());
        }
        // No request may dirty the caches between their write-back and the
        // switch to inactive: both happen in one drained section.
        drained_async(std::slice::from_ref(self), || async {
            // The image holds the persistent bitmaps from now on; the node
            // loads them again when it takes the image back.
            self.store_bitmaps().await;
            self.bitmaps.release_persistent();
            self.driver
                .inactivate()
                .await
                .map_err(|e| e.context("Failed to inactivate node"))?;
            self.active.store(false, Ordering::Release);
            Ok::<(), Error>(())
        })
        .await?;
        if self.children().is_empty() && self.stored_perm().is_some() {
            // Only loosening: an error would leave the image no less shared.
            let _ = self.driver.set_perm(Perm::NONE, Perm::ALL);
        }
        for c in self.children() {
            Box::pin(c.node.inactivate_recurse()).await?;
        }
        Ok(())
    }

    /// Takes the image back (QEMU: bdrv_activate): children first, then
    /// the node's locks, then its metadata read again from disk; an image
    /// changed into something unusable is an error and the node stays
    /// inactive.
    pub async fn activate(self: &Arc<Self>) -> Result<()> {
        for c in self.children() {
            Box::pin(c.node.activate()).await?;
        }
        if self.is_active() {
            return Ok(());
        }
        if self.children().is_empty() {
            if let Some((perm, shared)) = self.stored_perm() {
                self.driver.set_perm(perm, shared)?;
            }
        }
        self.active.store(true, Ordering::Release);
        if let Err(e) = self.driver.invalidate_cache().await {
            self.active.store(false, Ordering::Release);
            return Err(e);
        }
        self.driver.load_bitmaps(&self.bitmaps).await
    }

    fn stored_perm(&self) -> Option<(Perm, Perm)> {
        *self.perm.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Turns the write cache on or off (off: every write is flushed, as FUA).
    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed);
    }
    /// The in-flight requests of this node.
    pub(crate) fn tracker(&self) -> &Tracker {
        &self.tracker
    }
    /// True when reads copy backing data into this node.
    pub fn copy_on_read(&self) -> bool {
        self.copy_on_read
    }
    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.tracker.in_flight()
    }

    fn check_request(&self, offset: u64, len: u64) -> Result<()> {
        let growable = self.driver.growable();
        match offset.checked_add(len) {
            Some(_) if growable => Ok(()),
            Some(end) if end <= self.length() => Ok(()),
            _ => err(libc::EIO),
        }
    }

    fn check_writable(&self) -> Result<()> {
        // An inactive node's image belongs to another process.
        if self.is_read_only() || !self.is_active() {
            return err(libc::EPERM);
        }
        Ok(())
    }

    /// Drops the caller's reference (QEMU: bdrv_unref). The last one closes
    /// the node: caches are written back, the image is released and the
    /// driver drops its own references to the children, which close in turn
    /// when no one else holds them.
    pub async fn close(&self) -> Result<()> {
        let dec = self
            .refs
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1));
        if dec != Ok(1) || self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if self.is_active() && !self.is_read_only() {
            self.store_bitmaps().await;
        }
        let r = self.driver.close().await;
        self.detach_children();
        r
    }
}

/// A node's limits: what its driver says, merged with its backing child's
/// as QEMU's bdrv_merge_limits merges them (drivers already take their file
/// and filtered children into account; none looks at its backing file).
fn limits_of(driver: &dyn Driver) -> Limits {
    let mut l = driver.limits();
    for c in driver.children() {
        if c.role == ChildRole::Backing {
            let b = c.node.limits();
            l.max_transfer = match (l.max_transfer, b.max_transfer) {
                (0, x) | (x, 0) => x,
                (x, y) => x.min(y),
            };
            l.memory_alignment = l.memory_alignment.max(b.memory_alignment);
            l.discard_alignment = l.discard_alignment.max(b.discard_alignment);
        }
    }
    l
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({}, {})", self.name, self.driver.format_name())
    }
}
