//! Nodes of the block graph and the one request path every request takes
//! (QEMU: BlockDriverState and block/io.c): bounds and read-only checks,
//! alignment with read-modify-write under a serialising tracked request,
//! splitting at the maximum transfer, write-zeroes fallback, flush and FUA
//! semantics of the cache mode, and block status with pass-through.

use crate::blockers::{BlockOp, Blocker, OpBlockers};
use crate::buf::IoBuf;
use crate::debug::DebugEvent;
use crate::driver::{Child, ChildRole, Driver, Limits, Perm, WriteFlags};
use crate::error::{err, Error, Result};
use crate::event_loop::LoopHandle;
use crate::graph::ParentLink;
use crate::status::BlockStatus;
use crate::tracked::Tracker;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Cache mode of a node tree (`-t` / `cache=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheMode {
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// The guest-visible write cache is on: writes need not be stable until a flush.
    pub writeback: bool,
    /// Flushes are ignored.
    pub no_flush: bool,
}

impl CacheMode {
    /// The default: writeback through the host page cache.
    pub const WRITEBACK: CacheMode = CacheMode {
        direct: false,
        writeback: true,
        no_flush: false,
    };

    /// Parses a cache mode name as QEMU's tools accept it.
    pub fn parse(s: &str) -> Result<CacheMode> {
        let (direct, writeback, no_flush) = match s {
            "writeback" => (false, true, false),
            "none" | "off" => (true, true, false),
            "writethrough" => (false, false, false),
            "directsync" => (true, false, false),
            "unsafe" => (false, true, true),
            _ => return Err(Error::invalid(format!("Invalid cache option: {s}"))),
        };
        Ok(CacheMode {
            direct,
            writeback,
            no_flush,
        })
    }
}

impl Default for CacheMode {
    fn default() -> Self {
        CacheMode::WRITEBACK
    }
}

/// What a node does with writes of buffers that are all zeroes
/// (`detect-zeroes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Write them as they are.
    #[default]
    Off,
    /// Turn them into write-zeroes requests.
    On,
    /// Turn them into write-zeroes requests that may deallocate, when the
    /// node passes discards on.
    Unmap,
}

impl DetectZeroes {
    /// Parses the option value as QEMU spells it.
    pub fn parse(s: &str) -> Result<DetectZeroes> {
        match s {
            "off" => Ok(DetectZeroes::Off),
            "on" => Ok(DetectZeroes::On),
            "unmap" => Ok(DetectZeroes::Unmap),
            _ => Err(Error::invalid(format!(
                "Parameter 'detect-zeroes' does not accept value '{s}'"
            ))),
        }
    }
}

/// The options every node takes, whatever its driver (QEMU: the common
/// runtime options of bdrv_open_common).
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeOptions {
    /// Writes are refused.
    pub read_only: bool,
    /// Cache mode.
    pub cache: CacheMode,
    /// Discard requests are passed on (`discard=unmap`); else they succeed
    /// doing nothing.
    pub unmap: bool,
    /// Zero-buffer detection on writes.
    pub detect_zeroes: DetectZeroes,
    /// Reads copy what they find in the backing chain into this node.
    pub copy_on_read: bool,
    /// Opened inactive (`active=off`): another process owns the image until
    /// the node is activated.
    pub inactive: bool,
}

static NEXT_AUTO_NAME: AtomicU64 = AtomicU64::new(0);

/// A node of the block graph: a driver instance with its request path.
pub struct Node {
    name: String,
    filename: String,
    identity: crate::filename::Identity,
    driver: Box<dyn Driver>,
    read_only: bool,
    writeback: AtomicBool,
    no_flush: bool,
    unmap: bool,
    detect_zeroes: DetectZeroes,
    copy_on_read: bool,
    /// Recomputed whenever the children change (QEMU: bdrv_refresh_limits).
    limits: Mutex<Limits>,
    tracker: Tracker,
    closed: AtomicBool,
    /// Users holding the node open: its opener, parents that found it by
    /// name, the monitor (QEMU: refcnt). The node closes when this reaches 0.
    refs: AtomicUsize,
    /// The edges from the parents that use this node.
    parents: Mutex<Vec<ParentLink>>,
    blockers: OpBlockers,
    /// What this node blocks on its backing child while it uses it.
    backing_blocker: Arc<Blocker>,
    /// The loop the node and its users run on; None: the main loop.
    home: Mutex<Option<LoopHandle>>,
    /// Drained sections holding new requests back (QEMU: quiesce_counter).
    gate: AtomicUsize,
    gate_open: Notify,
    /// False while another process owns the image (QEMU: BDRV_O_INACTIVE).
    active: AtomicBool,
    /// What the node's parents asked for on it, taken again on activation.
    perm: Mutex<Option<(Perm, Perm)>>,
}

impl Node {
    /// Wraps an open driver in a node. `name` empty gives an automatic one.
    pub fn new(
        name: &str,
        identity: crate::filename::Identity,
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
            filename: identity.filename(),
            identity,
            driver,
            read_only: opts.read_only,
            writeback: AtomicBool::new(opts.cache.writeback),
            no_flush: opts.cache.no_flush,
            unmap: opts.unmap,
            detect_zeroes: opts.detect_zeroes,
            copy_on_read: opts.copy_on_read,
            limits: Mutex::new(limits),
            tracker: Tracker::default(),
            closed: AtomicBool::new(false),
            refs: AtomicUsize::new(1),
            parents: Mutex::new(Vec::new()),
            blockers: OpBlockers::default(),
            backing_blocker,
            home: Mutex::new(None),
            gate: AtomicUsize::new(0),
            gate_open: Notify::new(),
            active: AtomicBool::new(!opts.inactive),
            perm: Mutex::new(None),
        });
        node.attach_children();
        node
    }

    /// Makes this node a parent of each of its children (QEMU:
    /// bdrv_attach_child): a backing child gets every operation blocked but
    /// those that work through a chain in use (commit into it, stream, backup).
    fn attach_children(self: &Arc<Self>) {
        for c in self.children() {
            self.attach_child(&c);
        }
    }

    fn attach_child(self: &Arc<Self>, c: &Child) {
        c.node.lock_parents().push(ParentLink {
            parent: Arc::downgrade(self),
            parent_name: self.name.clone(),
            role: c.role,
        });
        if c.role == ChildRole::Backing {
            let b = &self.backing_blocker;
            c.node.blockers.block_all(b);
            for op in [
                BlockOp::CommitTarget,
                BlockOp::Stream,
                BlockOp::BackupSource,
                BlockOp::BackupTarget,
            ] {
                c.node.blockers.unblock(op, b);
            }
        }
    }

    fn detach_child(&self, c: &Child) {
        c.node
            .lock_parents()
            .retain(|p| !(std::ptr::eq(p.parent.as_ptr(), self) && p.role == c.role));
        if c.role == ChildRole::Backing {
            c.node.blockers.unblock_all(&self.backing_blocker);
        }
    }

    /// True when `target` is this node or lies anywhere below it.
    fn reaches(&self, target: &Node) -> bool {
        std::ptr::eq(self, target) || self.children().iter().any(|c| c.node.reaches(target))
    }

    /// Makes `backing` this node's backing file in place of the one it has
    /// (QEMU: bdrv_set_backing_hd): the node takes a reference to the new
    /// one and drops its reference to the old one; limits are refreshed.
    pub async fn set_backing(self: &Arc<Self>, backing: Option<Arc<Node>>) -> Result<()> {
        if !self.driver.supports_backing() {
            return Err(Error::invalid(format!(
                "Driver '{}' of node '{}' does not support backing files",
                self.format_name(),
                self.name
            )));
        }
        if let Some(b) = &backing {
            if b.reaches(self) {
                return Err(Error::invalid(format!(
                    "Making '{}' a backing child of '{}' would create a cycle",
                    b.name, self.name
                )));
            }
            b.add_ref();
        }
        let old = self.backing();
        if let Err(e) = self.driver.set_backing(backing.clone()) {
            if let Some(b) = &backing {
                b.close().await?;
            }
            return Err(e);
        }
        if let Some(o) = &old {
            self.detach_child(&Child {
                role: ChildRole::Backing,
                node: Arc::clone(o),
            });
        }
        if let Some(b) = backing {
            self.attach_child(&Child {
                role: ChildRole::Backing,
                node: b,
            });
        }
        self.refresh_limits();
        match old {
            Some(o) => o.close().await,
            None => Ok(()),
        }
    }

    /// Undoes [`attach_children`](Self::attach_children) once this node is closed.
    fn detach_children(&self) {
        for c in self.children() {
            c.node
                .lock_parents()
                .retain(|p| !std::ptr::eq(p.parent.as_ptr(), self));
            if c.role == ChildRole::Backing {
                c.node.blockers.unblock_all(&self.backing_blocker);
            }
        }
    }

    fn lock_parents(&self) -> std::sync::MutexGuard<'_, Vec<ParentLink>> {
        self.parents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The edges from the nodes that use this one as a child.
    pub fn parents(&self) -> Vec<ParentLink> {
        self.lock_parents().clone()
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

    /// Every node connected to this one through parent and child edges:
    /// what has to move between loops together (QEMU moves the same set).
    pub fn component(self: &Arc<Self>) -> Vec<Arc<Node>> {
        let mut seen: Vec<Arc<Node>> = vec![Arc::clone(self)];
        let mut i = 0;
        while i < seen.len() {
            let n = Arc::clone(&seen[i]);
            let near = n
                .children()
                .into_iter()
                .map(|c| c.node)
                .chain(n.parents().into_iter().filter_map(|p| p.parent.upgrade()));
            for m in near {
                if !seen.iter().any(|s| Arc::ptr_eq(s, &m)) {
                    seen.push(m);
                }
            }
            i += 1;
        }
        seen
    }

    /// Moves this node, and every node connected to it, to `to` (None: the
    /// main loop), drained (QEMU: bdrv_try_change_aio_context): requests in
    /// flight finish first, and new ones wait until the move is done.
    pub async fn move_to(self: &Arc<Self>, to: Option<LoopHandle>) {
        let nodes = self.component();
        drained(&nodes, || {
            for n in &nodes {
                *n.home.lock().unwrap_or_else(|p| p.into_inner()) = to.clone();
            }
        })
        .await
    }

    /// Waits while a drained section holds new requests back.
    async fn pass_gate(&self) {
        while self.gate.load(Ordering::Acquire) > 0 {
            let open = self.gate_open.notified();
            tokio::pin!(open);
            open.as_mut().enable();
            if self.gate.load(Ordering::Acquire) == 0 {
                return;
            }
            open.await;
        }
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
    pub fn filename(&self) -> &str {
        &self.filename
    }
    /// What the node's parents need to name themselves.
    pub fn identity(&self) -> &crate::filename::Identity {
        &self.identity
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
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// The limits requests to this node obey.
    pub fn limits(&self) -> Limits {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the driver for its limits again, then the parents, whose limits
    /// may follow from this node's (QEMU: bdrv_refresh_limits).
    pub fn refresh_limits(&self) {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = limits_of(&*self.driver);
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
    /// bdrv_primary_bs): `file` of a format, the filtered child of a filter.
    pub fn primary_child(&self) -> Option<Arc<Node>> {
        self.children()
            .into_iter()
            .find(|c| c.role.is_primary())
            .map(|c| c.node)
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
        self.driver
            .inactivate()
            .await
            .map_err(|e| e.context("Failed to inactivate node"))?;
        drained(std::slice::from_ref(self), || {
            self.active.store(false, Ordering::Release)
        })
        .await;
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
        Ok(())
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
        if self.read_only || !self.is_active() {
            return err(libc::EPERM);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.read_with(offset, buf, self.copy_on_read).await
    }

    /// Reads `buf.len()` bytes at `offset`, copying what comes from the
    /// backing chain into this node whatever its own copy-on-read setting
    /// (QEMU: BDRV_REQ_COPY_ON_READ, as the copy-on-read filter asks).
    pub async fn read_cor(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.read_with(offset, buf, true).await
    }

    async fn read_with(&self, offset: u64, buf: IoBuf, copy_on_read: bool) -> Result<IoBuf> {
        self.pass_gate().await;
        let len = buf.len() as u64;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(buf);
        }
        if copy_on_read {
            return self.read_copy_on_read(offset, buf).await;
        }
        // Waits only for overlapping serialising requests (read-modify-write).
        let _req = self.tracker.begin(offset, offset + len, false).await;
        let limits = self.limits();
        let align = limits.request_alignment.max(1) as u64;
        let mem_ok = buf.is_aligned(limits.memory_alignment.max(1) as usize);
        if offset.is_multiple_of(align) && len.is_multiple_of(align) && mem_ok {
            return self.read_aligned(offset, buf).await;
        }
        // Unaligned: read the aligned cover into a bounce buffer and copy out.
        let start = offset / align * align;
        let end = (offset + len).div_ceil(align) * align;
        let bounce = self
            .read_aligned(start, IoBuf::zeroed((end - start) as usize))
            .await?;
        let mut buf = buf;
        let skip = (offset - start) as usize;
        buf.as_mut_slice()
            .copy_from_slice(&bounce.as_slice()[skip..skip + len as usize]);
        Ok(buf)
    }

    /// Reads an aligned range, split at the maximum transfer.
    pub(crate) async fn read_aligned(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let max = self.limits().max_transfer;
        if max == 0 || buf.len() as u64 <= max {
            return self.driver.read(offset, buf).await;
        }
        let mut parts = Vec::new();
        let mut rest = buf;
        let mut off = offset;
        while !rest.is_empty() {
            let n = (rest.len() as u64).min(max) as usize;
            let (head, tail) = rest.split_at(n);
            parts.push(self.driver.read(off, head).await?);
            off += n as u64;
            rest = tail;
        }
        Ok(IoBuf::join_all(parts))
    }

    /// Writes `buf` at `offset`.
    pub async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        self.pass_gate().await;
        self.check_writable()?;
        let len = buf.len() as u64;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(buf);
        }
        let limits = self.limits();
        let align = limits.request_alignment.max(1) as u64;
        let mem_ok = buf.is_aligned(limits.memory_alignment.max(1) as usize);
        let buf = if offset.is_multiple_of(align) && len.is_multiple_of(align) && mem_ok {
            let _req = self.tracker.begin(offset, offset + len, false).await;
            self.write_aligned(offset, buf, flags).await?
        } else {
            // Read-modify-write of the partial sectors, serialised against
            // every overlapping request so no write tears another.
            let start = offset / align * align;
            let end = (offset + len).div_ceil(align) * align;
            let _req = self.tracker.begin(start, end, true).await;
            let mut bounce = self.rmw_read(start, end, offset, offset + len).await?;
            let skip = (offset - start) as usize;
            bounce.as_mut_slice()[skip..skip + len as usize].copy_from_slice(buf.as_slice());
            self.write_aligned(start, bounce, flags).await?;
            buf
        };
        self.after_write(flags).await?;
        Ok(buf)
    }

    /// Reads what a read-modify-write of `[from, to)` keeps of the aligned
    /// cover `[start, end)`: the head and tail blocks (one read when they
    /// are the whole cover), announcing QEMU's `pwritev_rmw_*` events to the
    /// blkdebug node below (the node whose alignment QEMU would pad for).
    /// The caller holds a serialising request over the cover.
    async fn rmw_read(&self, start: u64, end: u64, from: u64, to: u64) -> Result<IoBuf> {
        let align = self.limits().request_alignment.max(1) as u64;
        let (head, tail) = (from != start, to != end);
        let merge = end - start == align || (head && tail && end - start == 2 * align);
        let mut bounce = IoBuf::zeroed((end - start) as usize);
        if head || merge {
            let n = if merge { end - start } else { align };
            if head {
                self.rmw_event(DebugEvent::PwritevRmwHead).await;
            }
            if merge && tail {
                self.rmw_event(DebugEvent::PwritevRmwTail).await;
            }
            let got = self.driver.read(start, IoBuf::zeroed(n as usize)).await?;
            bounce.as_mut_slice()[..n as usize].copy_from_slice(got.as_slice());
            if head {
                self.rmw_event(DebugEvent::PwritevRmwAfterHead).await;
            }
            if merge && tail {
                self.rmw_event(DebugEvent::PwritevRmwAfterTail).await;
            }
            if merge {
                return Ok(bounce);
            }
        }
        if tail {
            self.rmw_event(DebugEvent::PwritevRmwTail).await;
            let got = self
                .driver
                .read(end - align, IoBuf::zeroed(align as usize))
                .await?;
            let at = (end - start - align) as usize;
            bounce.as_mut_slice()[at..].copy_from_slice(got.as_slice());
            self.rmw_event(DebugEvent::PwritevRmwAfterTail).await;
        }
        Ok(bounce)
    }

    /// Announces a read-modify-write event to the first node at or below
    /// this one that takes debug events (alignment is inherited upwards
    /// here, so the padding happens above the node QEMU pads at).
    async fn rmw_event(&self, event: DebugEvent) {
        if self.driver.debug_hooks().is_some() {
            return self.debug_event(event).await;
        }
        let mut next = self.primary_child();
        while let Some(n) = next {
            if n.driver().debug_hooks().is_some() {
                return n.debug_event(event).await;
            }
            next = n.primary_child();
        }
    }

    pub(crate) async fn write_aligned(
        &self,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> Result<IoBuf> {
        if self.detect_zeroes != DetectZeroes::Off && crate::buf::is_zero(buf.as_slice()) {
            // A buffer of zeroes becomes a write-zeroes request (QEMU:
            // bdrv_aligned_pwritev); drivers that cannot write zeroes
            // without a buffer get the buffer after all.
            let zflags = WriteFlags {
                may_unmap: self.detect_zeroes == DetectZeroes::Unmap && self.unmap,
                ..flags
            };
            self.debug_event(DebugEvent::PwritevZero).await;
            let r = self
                .driver
                .write_zeroes(offset, buf.len() as u64, zflags)
                .await;
            match r {
                Err(e) if e.code() == libc::ENOTSUP => {}
                r => {
                    self.debug_event(DebugEvent::PwritevDone).await;
                    return r.map(|()| buf);
                }
            }
        }
        // QEMU's bdrv_aligned_pwritev events, heard by blkdebug on itself.
        self.debug_event(DebugEvent::Pwritev).await;
        let r = self.write_split(offset, buf, flags).await;
        self.debug_event(DebugEvent::PwritevDone).await;
        r
    }

    /// Hands an aligned write to the driver in pieces of at most the
    /// maximum transfer.
    async fn write_split(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let max = self.limits().max_transfer;
        if max == 0 || buf.len() as u64 <= max {
            return self.driver.write(offset, buf, flags).await;
        }
        let mut parts = Vec::new();
        let mut rest = buf;
        let mut off = offset;
        while !rest.is_empty() {
            let n = (rest.len() as u64).min(max) as usize;
            let (head, tail) = rest.split_at(n);
            parts.push(self.driver.write(off, head, flags).await?);
            off += n as u64;
            rest = tail;
        }
        Ok(IoBuf::join_all(parts))
    }

    /// With the write cache off, or FUA asked for, a write is flushed before it completes.
    async fn after_write(&self, flags: WriteFlags) -> Result<()> {
        if flags.fua || !self.writeback.load(Ordering::Relaxed) {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeroes. Partial blocks at
    /// either end are written as zeroed blocks under a serialising request;
    /// the aligned middle goes to the driver in pieces its limits allow.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.pass_gate().await;
        self.check_writable()?;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let align = self.limits().request_alignment.max(1) as u64;
        let end = offset + len;
        if offset.is_multiple_of(align) && len.is_multiple_of(align) {
            let _req = self.tracker.begin(offset, end, false).await;
            self.zeroes_aligned(offset, len, flags).await?;
        } else {
            if flags.no_fallback {
                return err(libc::ENOTSUP);
            }
            let start = offset / align * align;
            let cover_end = end.div_ceil(align) * align;
            let _req = self.tracker.begin(start, cover_end, true).await;
            let mid_start = offset.div_ceil(align) * align;
            let mid_end = (end / align * align).max(mid_start);
            if start < offset {
                self.zero_partial_block(start, offset, end.min(start + align), flags)
                    .await?;
            }
            if mid_start < mid_end {
                self.zeroes_aligned(mid_start, mid_end - mid_start, flags)
                    .await?;
            }
            let tail = end / align * align;
            let head_done = start < offset;
            let tail_partial = !end.is_multiple_of(align);
            if tail_partial && (!head_done || tail != start) {
                self.zero_partial_block(tail, tail.max(offset), end, flags)
                    .await?;
            }
        }
        self.after_write(flags).await
    }

    /// Zeroes `[from, to)` inside the aligned block at `block` by
    /// read-modify-write (the caller holds a serialising request).
    async fn zero_partial_block(
        &self,
        block: u64,
        from: u64,
        to: u64,
        flags: WriteFlags,
    ) -> Result<()> {
        let align = self.limits().request_alignment.max(1) as u64;
        let mut b = self.rmw_read(block, block + align, from, to).await?;
        b.as_mut_slice()[(from - block) as usize..(to - block) as usize].fill(0);
        let plain = WriteFlags {
            may_unmap: false,
            ..flags
        };
        self.write_aligned(block, b, plain).await.map(|_| ())
    }

    /// Zeroes an aligned range (QEMU: bdrv_co_do_pwrite_zeroes): pieces
    /// aligned to the write-zeroes alignment and at most its maximum; a
    /// piece the driver cannot zero is written as buffers of zeroes.
    async fn zeroes_aligned(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        const MAX_BOUNCE: u64 = 16 << 20;
        let l = self.limits();
        let align = (l.write_zeroes_alignment as u64).max(l.request_alignment.max(1) as u64);
        let max_zero = aligned_max(l.max_write_zeroes, align);
        let max_transfer = match l.max_transfer {
            0 => MAX_BOUNCE,
            m => m.min(MAX_BOUNCE),
        };
        let mut head = offset % align;
        let tail = (offset + len) % align;
        let mut off = offset;
        let mut left = len;
        while left > 0 {
            let mut num = left;
            if head != 0 {
                // Up to the first aligned offset (and at most one transfer).
                num = left.min(max_transfer).min(align - head);
                head = (head + num) % align;
            } else if tail != 0 && num > align {
                num -= tail;
            }
            num = num.min(max_zero);
            match self.driver.write_zeroes(off, num, flags).await {
                Err(e) if e.code() == libc::ENOTSUP && !flags.no_fallback => {
                    let plain = WriteFlags {
                        may_unmap: false,
                        ..flags
                    };
                    let mut at = off;
                    let mut zeroes = IoBuf::zeroed(num.min(max_transfer) as usize);
                    while at < off + num {
                        let n = (off + num - at).min(max_transfer);
                        if n as usize != zeroes.len() {
                            zeroes = IoBuf::zeroed(n as usize);
                        }
                        zeroes = self.driver.write(at, zeroes, plain).await?;
                        at += n;
                    }
                }
                r => r?,
            }
            off += num;
            left -= num;
        }
        Ok(())
    }

    /// Discards `len` bytes at `offset` (QEMU: bdrv_co_pdiscard), in pieces
    /// aligned to the discard alignment; drivers that cannot discard a
    /// piece, and nodes opened with `discard=ignore`, just succeed.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.pass_gate().await;
        self.check_writable()?;
        self.check_request(offset, len)?;
        if len == 0 || !self.unmap {
            return Ok(());
        }
        let _req = self.tracker.begin(offset, offset + len, false).await;
        let l = self.limits();
        let rq = l.request_alignment.max(1) as u64;
        let align = (l.discard_alignment as u64).max(rq);
        let max_discard = aligned_max(l.max_discard, align);
        let mut head = offset % align;
        let mut tail = (offset + len) % align;
        let mut off = offset;
        let mut left = len;
        while left > 0 {
            let mut num = left;
            if head != 0 {
                num = left.min(align - head);
                if !num.is_multiple_of(rq) {
                    num %= rq;
                }
                head = (head + num) % align;
            } else if tail != 0 {
                if num > align {
                    num -= tail;
                } else if !tail.is_multiple_of(rq) && tail > rq {
                    // The unaligned last bytes go alone, in the next round.
                    tail %= rq;
                    num -= tail;
                }
            }
            num = num.min(max_discard);
            match self.driver.discard(off, num).await {
                Err(e) if e.code() == libc::ENOTSUP => {}
                r => r?,
            }
            off += num;
            left -= num;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` compressed, for formats that can (QEMU:
    /// BDRV_REQ_WRITE_COMPRESSED); the driver checks cluster alignment.
    pub async fn write_compressed(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        self.pass_gate().await;
        self.check_writable()?;
        let len = buf.len() as u64;
        self.check_request(offset, len)?;
        // An empty write goes to the driver too: it ends a series of them.
        let _req = self.tracker.begin(offset, offset + len, false).await;
        let buf = self.driver.write_compressed(offset, buf).await?;
        self.after_write(WriteFlags::default()).await?;
        Ok(buf)
    }

    /// The node that keeps VM state for this one: itself, or the first down
    /// its primary children that does (QEMU: bdrv_co_writev_vmstate).
    fn vmstate_node(self: &Arc<Self>) -> Option<Arc<Node>> {
        self.find_down(|n| n.driver.has_vmstate())
    }

    /// Saves VM state at `pos`; with the write cache off it is flushed
    /// before this returns (QEMU: blk_save_vmstate).
    pub async fn save_vmstate(self: &Arc<Self>, pos: u64, buf: IoBuf) -> Result<IoBuf> {
        self.check_writable()?;
        let Some(node) = self.vmstate_node() else {
            return err(libc::ENOTSUP);
        };
        let buf = node.driver.save_vmstate(pos, buf).await?;
        if !self.writeback.load(Ordering::Relaxed) {
            self.flush().await?;
        }
        Ok(buf)
    }

    /// Loads VM state at `pos`.
    pub async fn load_vmstate(self: &Arc<Self>, pos: u64, buf: IoBuf) -> Result<IoBuf> {
        let Some(node) = self.vmstate_node() else {
            return err(libc::ENOTSUP);
        };
        node.driver.load_vmstate(pos, buf).await
    }

    /// Makes completed writes stable (a no-op with `cache=unsafe`).
    pub async fn flush(&self) -> Result<()> {
        if self.no_flush {
            return Ok(());
        }
        self.pass_gate().await;
        // Tracked so that a drained section waits for it; it overlaps nothing.
        let _req = self.tracker.begin(0, 0, false).await;
        self.driver.flush().await
    }

    /// Changes the length of the node. Growing serialises the new range
    /// (QEMU: BDRV_TRACKED_TRUNCATE), so no request in flight there sees it
    /// half made. Shrinking waits for nobody, as in QEMU (a write held in
    /// flight past the new end would otherwise hang the caller): formats
    /// keep the clusters such a write still targets from being reused.
    pub async fn truncate(&self, size: u64, prealloc: crate::driver::Preallocation) -> Result<()> {
        self.pass_gate().await;
        self.check_writable()?;
        let old = self.length();
        let _req = self.tracker.begin(old.min(size), size, true).await;
        self.driver.truncate(size, prealloc).await
    }

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
                let mut inner = Box::pin(child.block_status(host, st.len)).await?;
                if inner.host.is_none() {
                    inner.host = Some((child, host));
                }
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

    /// Block status through the backing chain down to (not including) `base`:
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
            match node.backing() {
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
        let r = self.driver.close().await;
        self.detach_children();
        r
    }
}

/// Runs `f` with `nodes` drained (QEMU: bdrv_drained_begin/end): new
/// requests from the users of the topmost nodes wait, and every request in
/// flight finishes, before `f` runs. Requests that in-flight ones make to
/// children are not held, so a drain never waits for itself.
pub async fn drained<R>(nodes: &[Arc<Node>], f: impl FnOnce() -> R) -> R {
    let tops: Vec<Arc<Node>> = nodes
        .iter()
        .filter(|n| n.lock_parents().is_empty())
        .cloned()
        .collect();
    // Reopens the gates even if the caller drops this future mid-drain.
    struct Reopen(Vec<Arc<Node>>);
    impl Drop for Reopen {
        fn drop(&mut self) {
            for n in &self.0 {
                n.gate.fetch_sub(1, Ordering::AcqRel);
                n.gate_open.notify_waiters();
            }
        }
    }
    for n in &tops {
        n.gate.fetch_add(1, Ordering::AcqRel);
    }
    let _reopen = Reopen(tops);
    for n in nodes {
        n.tracker.wait_idle().await;
    }
    f()
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

/// A request maximum (0: none) rounded down to `align`, at least `align`.
fn aligned_max(max: u64, align: u64) -> u64 {
    match max {
        0 => u64::MAX / align * align,
        m => (m / align * align).max(align),
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({}, {})", self.name, self.driver.format_name())
    }
}
