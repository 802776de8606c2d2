//! The driver traits: [`DriverClass`] is a kind of node (a format, a protocol,
//! a filter) as the registry knows it; [`Driver`] is one open instance of it,
//! the state behind a [`crate::Node`].
//!
//! A driver gets requests the core has already bounds-checked and aligned to
//! its limits, and talks to its children only through their nodes.

use crate::bitmap::DirtyBitmaps;
use crate::buf::IoBuf;
use crate::error::{err, Error, Result};
use crate::node::Node;
use crate::open::OpenCtx;
use crate::options::{OptSpec, Opts};
use crate::status::BlockStatus;
use async_trait::async_trait;
use std::sync::Arc;

/// Permissions a user of a node takes or shares (QEMU's BLK_PERM_*; the bit
/// numbers are those of QEMU's image locking bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Perm(pub u8);

impl Perm {
    /// Reads return what was written (not a half-updated view).
    pub const CONSISTENT_READ: Perm = Perm(1 << 0);
    /// May change the data.
    pub const WRITE: Perm = Perm(1 << 1);
    /// May write data that does not change what a reader sees.
    pub const WRITE_UNCHANGED: Perm = Perm(1 << 2);
    /// May change the size.
    pub const RESIZE: Perm = Perm(1 << 3);
    /// Every permission.
    pub const ALL: Perm = Perm(0x0f);
    /// No permission.
    pub const NONE: Perm = Perm(0);

    /// The QEMU name of one permission bit, as its lock errors spell it.
    pub fn bit_name(bit: u8) -> &'static str {
        match bit {
            0 => "consistent read",
            1 => "write",
            2 => "write unchanged",
            3 => "resize",
            _ => "unknown",
        }
    }
    /// True when every bit of `other` is in `self`.
    pub fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }
    /// Union.
    pub fn with(self, other: Perm) -> Perm {
        Perm(self.0 | other.0)
    }
    /// Difference.
    pub fn without(self, other: Perm) -> Perm {
        Perm(self.0 & !other.0)
    }
}

/// Flags on a write request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is stable when the request completes.
    pub fua: bool,
    /// For write_zeroes: the driver may deallocate instead of writing zeroes.
    pub may_unmap: bool,
    /// For write_zeroes: fail with ENOTSUP rather than write a buffer of zeroes.
    pub no_fallback: bool,
}

/// Limits a node puts on requests (QEMU: BlockLimits). Zero means "none".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Offsets and lengths of reads and writes must be multiples of this.
    pub request_alignment: u32,
    /// Buffers must start at a multiple of this.
    pub memory_alignment: u32,
    /// Longest read or write in one request.
    pub max_transfer: u64,
    /// Preferred alignment of discard (QEMU: pdiscard_alignment).
    pub discard_alignment: u32,
    /// Longest discard request.
    pub max_discard: u64,
    /// Alignment and maximum of write_zeroes.
    pub write_zeroes_alignment: u32,
    /// Longest write-zeroes request.
    pub max_write_zeroes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_alignment: 1,
            memory_alignment: 1,
            max_transfer: 0,
            discard_alignment: 0,
            max_discard: 0,
            write_zeroes_alignment: 0,
            max_write_zeroes: 0,
        }
    }
}

/// The role of a child edge; the variant also fixes the edge's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildRole {
    /// The node a format stores its image in, or a filter passes requests to
    /// (`file`).
    File,
    /// The image whose data shows through where this one has none.
    Backing,
    /// An external data file of qcow2.
    DataFile,
    /// The image under blkdebug.
    Image,
    /// The image blkverify checks against its `raw` child.
    Test,
    /// The reference image of blkverify.
    Raw,
    /// One of quorum's children (`children.N`).
    Quorum(u32),
    /// A LUKS header kept apart from the payload (`header`).
    Header,
    /// Where blklogwrites records the writes to its `file` (`log`).
    Log,
    /// Where copy-before-write copies old data to (`target`).
    Target,
}

impl ChildRole {
    /// The edge name as QEMU spells it.
    pub fn name(self) -> String {
        match self {
            ChildRole::File => "file".into(),
            ChildRole::Backing => "backing".into(),
            ChildRole::DataFile => "data-file".into(),
            ChildRole::Image => "image".into(),
            ChildRole::Test => "test".into(),
            ChildRole::Raw => "raw".into(),
            ChildRole::Quorum(i) => format!("children.{i}"),
            ChildRole::Header => "header".into(),
            ChildRole::Log => "log".into(),
            ChildRole::Target => "target".into(),
        }
    }
    /// The child that carries the parent's data and metadata, the one a
    /// debug breakpoint or a filter's transparency looks through.
    pub fn is_primary(self) -> bool {
        matches!(self, ChildRole::File | ChildRole::Image | ChildRole::Raw)
    }
    /// True for children that hold only guest data, which are format-probed
    /// when their parent is not a format (QEMU: BDRV_CHILD_DATA alone).
    pub fn is_pure_data(self) -> bool {
        matches!(
            self,
            ChildRole::Test | ChildRole::Quorum(_) | ChildRole::Target
        )
    }
}

/// A child edge a driver reads per request and the core can swap while
/// the node is open and drained (QEMU: BdrvChild.bs).
pub struct ChildCell(std::sync::RwLock<Arc<Node>>);

impl ChildCell {
    /// An edge to `node`.
    pub fn new(node: Arc<Node>) -> ChildCell {
        ChildCell(std::sync::RwLock::new(node))
    }
    /// The child now.
    pub fn get(&self) -> Arc<Node> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }
    /// Puts `node` in the place of the child; the old one is returned.
    pub fn set(&self, node: Arc<Node>) -> Arc<Node> {
        std::mem::replace(
            &mut *self.0.write().unwrap_or_else(|p| p.into_inner()),
            node,
        )
    }
}

/// A named edge from a node to a child.
#[derive(Clone)]
pub struct Child {
    /// The role of the child.
    pub role: ChildRole,
    /// The child node.
    pub node: Arc<Node>,
}

impl Child {
    /// An edge in `role` to `node`.
    pub fn new(role: ChildRole, node: &Arc<Node>) -> Child {
        Child {
            role,
            node: Arc::clone(node),
        }
    }
}

/// Format-specific facts that `info` shows (QEMU: ImageInfoSpecific), as JSON
/// in the key order qemu-img prints.
pub type FormatSpecific = serde_json::Value;

/// An internal snapshot as `info` lists it (QEMU: SnapshotInfo).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot's ID.
    pub id: String,
    /// Its name (tag).
    pub name: String,
    /// Bytes of saved VM state.
    pub vm_state_size: u64,
    /// Creation time.
    pub date_sec: u64,
    /// Creation time, nanoseconds.
    pub date_nsec: u64,
    /// Guest clock at the snapshot, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count, if recorded.
    pub icount: Option<u64>,
}

/// What `check` found (QEMU: BdrvCheckResult).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckResult {
    /// Corruptions (refcount too low, bad pointers).
    pub corruptions: u64,
    /// Leaked clusters (refcount too high).
    pub leaks: u64,
    /// Internal errors during the check.
    pub check_errors: u64,
    /// Corruptions fixed by repair.
    pub corruptions_fixed: u64,
    /// Leaks fixed by repair.
    pub leaks_fixed: u64,
    /// Clusters allocated to guest data.
    pub allocated_clusters: u64,
    /// Clusters the image could hold.
    pub total_clusters: u64,
    /// Fragmented clusters.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// The offset after the last used cluster.
    pub image_end_offset: u64,
}

/// What a repair may fix (`check -r`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepairMode {
    /// Fix leaks.
    pub leaks: bool,
    /// Fix corruptions too.
    pub errors: bool,
}

/// One open instance of a driver.
#[async_trait]
pub trait Driver: Send + Sync {
    /// The driver's name (`qcow2`, `raw`, `file`).
    fn format_name(&self) -> &'static str;

    /// The node's length in bytes.
    fn length(&self) -> u64;

    /// The children, for graph walks, `info --backing-chain` and block status.
    fn children(&self) -> Vec<Child> {
        Vec::new()
    }

    /// Limits on requests to this node.
    fn limits(&self) -> Limits {
        Limits::default()
    }

    /// True for protocols whose length follows their writes (a plain file
    /// grows when a format writes past its end; reads past it see zeroes).
    fn growable(&self) -> bool {
        false
    }

    /// True for formats that can have a backing file (unallocated ranges
    /// then read from it, or as zeroes when there is none).
    fn supports_backing(&self) -> bool {
        false
    }

    /// True for filters, which pass requests through to one child.
    fn is_filter(&self) -> bool {
        false
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf>;

    /// Writes `buf` at `offset`.
    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf>;

    /// Makes `len` bytes at `offset` read as zeroes, without a data buffer
    /// where the driver can. ENOTSUP makes the core write a zero buffer.
    async fn write_zeroes(&self, _offset: u64, _len: u64, _flags: WriteFlags) -> Result<()> {
        err(libc::ENOTSUP)
    }

    /// Tells the node the range is no longer needed; reads after it may
    /// return anything (for formats: usually zeroes or backing data).
    async fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    /// Makes every completed write stable.
    async fn flush(&self) -> Result<()>;

    /// What is at `offset` (at most `len` bytes of it).
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus>;

    /// Changes the length. Not `exact` (QEMU's flag): the node may end up
    /// longer than asked, and a node that cannot grow says so.
    async fn truncate(&self, _size: u64, _exact: bool, _prealloc: Preallocation) -> Result<()> {
        err(libc::ENOTSUP)
    }

    /// Bytes the node uses on the host (QEMU: allocated_file_size); None if unknown.
    async fn allocated_size(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// The driver's own counters for query-blockstats (QEMU:
    /// BlockStatsSpecific, its `driver` key left to the caller).
    fn specific_stats(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        None
    }

    /// Format-specific information for `info`.
    fn format_specific(&self) -> Option<FormatSpecific> {
        None
    }

    /// True when the driver answers QEMU's get_info (cluster size, VM
    /// state offset); null-co and the filters do not.
    fn has_info(&self) -> bool {
        !self.is_filter()
    }

    /// Cluster size, for `info` (formats that have one).
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// Bytes of guest writes whose clusters were found or allocated so far
    /// (formats that allocate; None for others). A single writer that sees
    /// this grow by a write's length while the write is in flight knows
    /// that the write's place in the file is decided: a later write can no
    /// longer be placed before it (convert's in-order writes use this).
    fn bytes_planned(&self) -> Option<u64> {
        None
    }

    /// The smallest unit a write allocates without copying on write
    /// around it (QEMU's BlockDriverInfo.subcluster_size): the cluster,
    /// unless the format splits it.
    fn subcluster_size(&self) -> Option<u64> {
        self.cluster_size()
    }

    /// True when the image is marked dirty (qcow2 lazy refcounts), for `info`.
    fn is_dirty(&self) -> bool {
        false
    }

    /// True when the image's data is encrypted (QEMU: bs->encrypted).
    fn encrypted(&self) -> bool {
        false
    }

    /// Zero writes may deallocate instead of writing (QEMU: BDRV_REQ_MAY_UNMAP
    /// in supported_zero_flags); a mirror zeroes its target that way.
    fn zeroes_may_unmap(&self) -> bool {
        false
    }

    /// True when a newly made image of this node reads as zeroes, so a
    /// copy may skip zero ranges (QEMU: bdrv_has_zero_init).
    fn has_zero_init(&self) -> bool {
        false
    }

    /// The driver itself, for operations only one format has (a format
    /// setting up what its own create needs).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// The backing file name as stored in the image, and its format.
    fn backing_file(&self) -> Option<(String, Option<String>)> {
        None
    }

    /// Writes a new backing file name and format into the image (QEMU:
    /// bdrv_co_change_backing_file); `None` makes the image stand alone.
    /// Only the stored names change; the open backing node stays.
    async fn change_backing_file(&self, _file: Option<&str>, _format: Option<&str>) -> Result<()> {
        err(libc::ENOTSUP)
    }

    /// Drops everything this layer holds, so that the backing file (or
    /// zeroes) shows through everywhere (QEMU: bdrv_make_empty, after a
    /// commit). Must be as safe as a discard with requests in flight.
    async fn make_empty(&self) -> Result<()> {
        err(libc::ENOTSUP)
    }

    /// Changes the image's options in place (QEMU: bdrv_amend_options);
    /// `opts` holds only the options the user set, checked against the
    /// class's `amend_options`. `status(done, total)` reports progress of
    /// long steps. The node is drained while it runs.
    async fn amend(
        &self,
        _opts: crate::options::Opts,
        _force: bool,
        _status: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<()> {
        err(libc::ENOTSUP)
    }

    /// Whether `x-blockdev-amend` can change this image (QEMU: a driver
    /// with bdrv_co_amend).
    fn can_blockdev_amend(&self) -> bool {
        false
    }

    /// The checks of `x-blockdev-amend` that need no I/O: a job that fails
    /// them ends before its command is answered, as QEMU's.
    fn blockdev_amend_check(&self, _opts: &crate::options::Opts) -> Result<()> {
        Ok(())
    }

    /// `x-blockdev-amend` (QEMU: bdrv_co_amend): the QAPI options of this
    /// driver (BlockdevAmendOptions without `driver`), applied while the
    /// image is open.
    async fn blockdev_amend(&self, _opts: crate::options::Opts, _force: bool) -> Result<()> {
        err(libc::ENOTSUP)
    }

    /// The internal snapshots, for `info`.
    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(Vec::new())
    }

    /// True when the format keeps internal snapshots itself (QEMU: the
    /// driver has bdrv_snapshot_create); otherwise the generic layer may
    /// fall back to the primary child (see `crate::snapshot`).
    fn has_internal_snapshots(&self) -> bool {
        false
    }

    /// Creates an internal snapshot of the disk as it is now, with a new id
    /// (the id in `sn` is ignored). The caller has drained the node.
    async fn snapshot_create(&self, _sn: &SnapshotInfo) -> Result<()> {
        err(libc::ENOTSUP)
    }

    /// Makes the disk the snapshot with this id, else this name, again.
    async fn snapshot_goto(&self, _id_or_name: &str) -> Result<()> {
        err(libc::ENOTSUP)
    }

    /// Deletes the first snapshot with this id and/or name.
    async fn snapshot_delete(&self, _id: Option<&str>, _name: Option<&str>) -> Result<()> {
        err(libc::ENOTSUP)
    }

    /// Shows a snapshot in place of the disk, read-only, until closed
    /// (QEMU: bdrv_snapshot_load_tmp).
    async fn snapshot_load_tmp(&self, _id: Option<&str>, _name: Option<&str>) -> Result<()> {
        err(libc::ENOTSUP)
    }

    /// Consistency check and repair.
    async fn check(&self, _repair: RepairMode) -> Result<CheckResult> {
        err(libc::ENOTSUP)
    }

    /// Takes (`perm`) and refuses to share (not in `shared`) permissions on
    /// the storage itself; protocols lock the image here.
    fn set_perm(&self, _perm: Perm, _shared: Perm) -> Result<()> {
        Ok(())
    }

    /// True for formats that write compressed clusters (QEMU:
    /// block_driver_can_compress).
    fn can_compress(&self) -> bool {
        false
    }

    /// Writes whole clusters compressed (`buf` starts on a cluster and is a
    /// whole number of them, or ends at the end of the disk).
    async fn write_compressed(&self, _offset: u64, _buf: IoBuf) -> Result<IoBuf> {
        err(libc::ENOTSUP)
    }

    /// True for formats that keep VM state beside the disk (qcow2).
    fn has_vmstate(&self) -> bool {
        false
    }

    /// Writes VM state at `pos` of the state area.
    async fn save_vmstate(&self, _pos: u64, _buf: IoBuf) -> Result<IoBuf> {
        err(libc::ENOTSUP)
    }

    /// Reads VM state at `pos` of the state area.
    async fn load_vmstate(&self, _pos: u64, _buf: IoBuf) -> Result<IoBuf> {
        err(libc::ENOTSUP)
    }

    /// Hears a debug event a parent announces for its next I/O on this node;
    /// called only on drivers that have `debug_hooks`.
    async fn debug_event(&self, _event: crate::debug::DebugEvent) {}

    /// False for drivers below which relative names have no one directory
    /// (blkverify, quorum: QEMU's bdrv_dirname fails for them).
    fn has_dirname(&self) -> bool {
        true
    }

    /// The driver's name where QEMU's messages spell it their own way
    /// ("NBD nodes").
    fn name_in_messages(&self) -> &'static str {
        self.format_name()
    }

    /// Breakpoint support, for drivers that have it (blkdebug).
    fn debug_hooks(&self) -> Option<&dyn crate::debug::DebugHooks> {
        None
    }

    /// What this node (`node`, whose driver this is) takes and shares on
    /// its child in `role`, given what its own users take and share
    /// together (QEMU: the driver's child_perm). QEMU's default rules by
    /// role unless the driver knows better.
    fn child_perm(&self, node: &Node, role: ChildRole, perm: Perm, shared: Perm) -> (Perm, Perm) {
        crate::perm::default_child_perm(node, role, perm, shared)
    }

    /// The swappable edge to the child in `role`, for drivers that keep it
    /// in a [`ChildCell`] (filters, raw): the default edge swap uses it.
    fn child_cell(&self, _role: ChildRole) -> Option<&ChildCell> {
        None
    }

    /// True when the child in `role` can be swapped for another node while
    /// open (see [`replace_child`](Self::replace_child)).
    fn can_replace_child(&self, role: ChildRole) -> bool {
        self.child_cell(role).is_some()
    }

    /// Puts `node` in the place of the child in `role` (QEMU:
    /// bdrv_replace_child_noperm). The core has checked permissions, drained
    /// the nodes and keeps the parent lists and references; the driver only
    /// switches the edge it reads per request.
    fn replace_child(&self, role: ChildRole, node: Arc<Node>) -> Result<()> {
        match self.child_cell(role) {
            Some(cell) => {
                cell.set(node);
                Ok(())
            }
            None => Err(Error::unsupported(format!(
                "Driver '{}' cannot replace its '{}' child",
                self.format_name(),
                role.name()
            ))),
        }
    }

    /// Replaces the backing child (QEMU: bdrv_set_backing_hd); the node has
    /// checked that the driver supports backing files and keeps the edges.
    fn set_backing(&self, _backing: Option<Arc<Node>>) -> Result<()> {
        Err(Error::unsupported(format!(
            "Driver '{}' cannot change its backing file",
            self.format_name()
        )))
    }

    /// True for formats that store dirty bitmaps in the image (QEMU:
    /// bdrv_supports_persistent_dirty_bitmap).
    fn supports_persistent_bitmaps(&self) -> bool {
        false
    }

    /// Loads the image's persistent bitmaps into the node's `bitmaps`, and
    /// keeps them to store later (QEMU: qcow2_load_dirty_bitmaps). Called
    /// once the node exists and whenever it becomes active again.
    async fn load_bitmaps(&self, _bitmaps: &Arc<DirtyBitmaps>) -> Result<()> {
        Ok(())
    }

    /// Writes the node's persistent bitmaps into the image (QEMU:
    /// qcow2_store_persistent_dirty_bitmaps); called before close and
    /// inactivation.
    async fn store_bitmaps(&self) -> Result<()> {
        Ok(())
    }

    /// May a new persistent bitmap `name` of `granularity` be stored in
    /// the image of node `node`? (QEMU: bdrv_co_can_store_new_dirty_bitmap,
    /// whose messages name the node.)
    async fn can_store_new_bitmap(&self, node: &str, _name: &str, _granularity: u64) -> Result<()> {
        Err(Error::msg(
            libc::ENOTSUP,
            format!("Can't store persistent bitmaps to {node}: Operation not supported"),
        ))
    }

    /// Removes persistent bitmap `name` from the image; absent is fine
    /// (QEMU: bdrv_co_remove_persistent_dirty_bitmap).
    async fn remove_persistent_bitmap(&self, _name: &str) -> Result<()> {
        Ok(())
    }

    /// Writes back everything cached, so that another process may take the
    /// image over (QEMU: bdrv_inactivate, the source side of migration).
    async fn inactivate(&self) -> Result<()> {
        self.flush().await
    }

    /// Drops everything cached and reads the image's state again, failing if
    /// what is on disk now is unusable (QEMU: bdrv_co_invalidate_cache, the
    /// destination side of migration). The node is quiet while it runs.
    async fn invalidate_cache(&self) -> Result<()> {
        Ok(())
    }

    /// Switches the driver between read-only and read-write in place
    /// (QEMU: bdrv_reopen_prepare/commit for the read-only flag), drained.
    /// Going read-write, the node's own children are already writable;
    /// going read-only, everything cached has been written back first.
    /// Drivers that keep no state of their own need nothing.
    async fn reopen_read_only(&self, _read_only: bool) -> Result<()> {
        Ok(())
    }

    /// Switches O_DIRECT (`cache.direct`) in place, drained (QEMU:
    /// file-posix's raw_reconfigure_getfd); the node asks for the limits
    /// again afterwards. Drivers with no file of their own need nothing:
    /// the option reaches their files as their children's.
    async fn reopen_direct(&self, _direct: bool) -> Result<()> {
        Ok(())
    }

    /// False for drivers QEMU cannot reopen (no bdrv_reopen_prepare:
    /// quorum, the job filters, ...): `blockdev-reopen` refuses them.
    fn reopen_supported(&self) -> bool {
        true
    }

    /// The driver's own options a reopen takes anew: they may change or be
    /// left out (QEMU: the options bdrv_reopen_prepare consumes, and
    /// mutable_opts); every other option must keep its value. A name
    /// covers its dotted sub-options.
    fn reopen_takes(&self) -> &'static [&'static str] {
        &[]
    }

    /// Checks the options of a reopen that `reopen_takes` names (one left
    /// out goes back to its default) as the driver's open checks them,
    /// changing nothing (QEMU: the driver's bdrv_reopen_prepare).
    fn reopen_check(&self, _opts: &Opts) -> Result<()> {
        Ok(())
    }

    /// Puts the options `reopen_check` passed in force, drained (QEMU: the
    /// driver's bdrv_reopen_commit, with what its prepare writes); on an
    /// error the old ones stay in force.
    async fn reopen_options(&self, _opts: &Opts) -> Result<()> {
        Ok(())
    }

    /// Writes back everything it caches of its `file` child, so that a
    /// reopen may put another node in that place; drained. (QEMU's qcow2
    /// keeps its caches through the swap; Strata reads the image again
    /// from the new node, see `reload_file`.)
    async fn release_file(&self) -> Result<()> {
        Ok(())
    }

    /// Reads again what it caches of its image, from the node now in its
    /// `file` place; drained, after `release_file` and the swap (or its
    /// undo).
    async fn reload_file(&self) -> Result<()> {
        Ok(())
    }

    /// Writes back everything cached and releases the image; called once.
    async fn close(&self) -> Result<()> {
        self.flush().await
    }
}

/// Preallocation modes of create and truncate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Allocate nothing ahead.
    #[default]
    Off,
    /// Allocate metadata only (formats).
    Metadata,
    /// Reserve host blocks with fallocate.
    Falloc,
    /// Write zeroes to every byte.
    Full,
}

impl Preallocation {
    /// Parses the option value as QEMU spells it.
    pub fn parse(s: &str) -> Result<Preallocation> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            _ => Err(crate::Error::invalid(format!(
                "Invalid preallocation mode: '{s}'"
            ))),
        }
    }
    /// The option value.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// A kind of node, as registered: creates images and opens nodes.
#[async_trait]
pub trait DriverClass: Send + Sync {
    /// The name used by `-f` and `driver=`.
    fn name(&self) -> &'static str;

    /// The prefix that selects this driver in a file name (`file:`,
    /// `blkdebug:`), for drivers that open from a file name by themselves
    /// (QEMU: protocol_name). Drivers without one get a `file` child.
    fn protocol_name(&self) -> Option<&'static str> {
        None
    }

    /// Protocols (file, nbd, blkdebug) open by themselves; formats and the
    /// other filters open on a `file` child.
    fn is_protocol(&self) -> bool {
        self.protocol_name().is_some()
    }

    /// Options that change what the node shows, so that its name must be
    /// `json:{...}` when they are given (QEMU: strong_runtime_opts); a key
    /// ending in `.` stands for every key under it.
    fn strong_options(&self) -> &'static [&'static str] {
        &[]
    }

    /// The plain file name of a node of this driver with the options `full`
    /// and these children, for drivers that make their own
    /// (QEMU: bdrv_refresh_filename of blkdebug, null-co). Some("") when no
    /// plain name fits; None to use the generic rule.
    fn exact_filename(
        &self,
        _full: &Opts,
        _children: &[(ChildRole, crate::filename::Identity)],
    ) -> Option<String> {
        None
    }

    /// Turns a file name given to this protocol into options (QEMU:
    /// bdrv_parse_filename). The default strips the `name:` prefix; a rest
    /// that would itself look like a protocol (`file:a:b`) gets `./` in
    /// front, as QEMU's bdrv_parse_filename_strip_prefix does.
    fn parse_filename(&self, filename: &str, opts: &mut Opts) -> Result<()> {
        let stripped = self
            .protocol_name()
            .and_then(|p| filename.strip_prefix(p))
            .and_then(|f| f.strip_prefix(':'));
        let f = match stripped {
            Some(rest) if crate::open::has_protocol(rest) => format!("./{rest}"),
            Some(rest) => rest.to_string(),
            None => filename.to_string(),
        };
        opts.insert("filename".into(), serde_json::Value::String(f));
        Ok(())
    }

    /// How sure this format is that `header` is one of its images (0 = no;
    /// raw answers 1, real formats 100).
    fn probe(&self, _header: &[u8], _filename: &str) -> u32 {
        0
    }

    /// True when images of this format can have a backing file.
    fn supports_backing(&self) -> bool {
        false
    }

    /// The permissions a node of this driver takes on its file child, given
    /// what its own user takes and shares. Pass-through by default (raw);
    /// formats with metadata override it.
    fn child_perms(
        &self,
        perm: Perm,
        shared: Perm,
        _flags: &crate::open::OpenFlags,
    ) -> (Perm, Perm) {
        (perm, shared)
    }

    /// The creation options, in the order QEMU's Formatting line prints them.
    fn create_options(&self) -> &'static [OptSpec] {
        &[]
    }

    /// The options `amend` takes (QEMU: amend_opts); None when the format
    /// cannot amend at all.
    fn amend_options(&self) -> Option<&'static [OptSpec]> {
        None
    }

    /// Creates an image at `filename` with the options given (including `size`).
    async fn create(&self, ctx: &OpenCtx, filename: &str, opts: Opts) -> Result<()>;

    /// Whether `blockdev-create` makes images of this driver (QEMU:
    /// has_bdrv_co_create).
    fn can_blockdev_create(&self) -> bool {
        false
    }

    /// The checks of `blockdev-create` made before any node is opened: a
    /// job that fails them ends before its command is answered, as QEMU's
    /// (whose create yields first where it opens a node).
    fn blockdev_create_check(&self, _opts: &Opts) -> Result<()> {
        Ok(())
    }

    /// `blockdev-create` (QEMU: bdrv_co_create): an image made from the
    /// QAPI options of this driver (BlockdevCreateOptions without
    /// `driver`); a format's `file` names or defines a node of `ctx`'s graph.
    async fn blockdev_create(&self, _ctx: &OpenCtx, _opts: Opts) -> Result<()> {
        Err(Error::unsupported(
            "Driver does not support blockdev-create",
        ))
    }

    /// How large an image of this format would be, made with `opts` (its
    /// `size`) or holding what `input` holds (QEMU: bdrv_measure).
    async fn measure(&self, _opts: Opts, _input: Option<&Arc<Node>>) -> Result<Measure> {
        Err(Error::unsupported(format!(
            "Block driver '{}' does not support size measurement",
            self.name()
        )))
    }

    /// Opens a node of this driver; consumes the options it knows from `opts`.
    async fn open(&self, ctx: &OpenCtx, opts: &mut Opts) -> Result<Box<dyn Driver>>;
}

/// What `qemu-img measure` reports (QEMU: BlockMeasureInfo), in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measure {
    /// The file size the image needs with its data.
    pub required: u64,
    /// The file size with every cluster allocated.
    pub fully_allocated: u64,
    /// The persistent bitmaps' size, where source and target can have them.
    pub bitmaps: Option<u64>,
}
